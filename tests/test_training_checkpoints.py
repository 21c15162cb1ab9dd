"""Training checkpoints are trusted only when checked: no pickle, atomic writes, fallback, no repeated metrics.

Runs are the tiny DistillSpec runs of test_training_distill (CPU, seconds). The invariants:
- nothing in a checkpoint folder is unpickled (a crafted pickle that would write a marker never runs);
- a checkpoint cut short (empty state file, truncated safetensors) is passed over, with a warning,
  for the previous complete one, and training from there ends bit-identical to an uninterrupted run;
- a kill while a checkpoint is written leaves no folder under a checkpoint's name;
- metrics.jsonl holds each step once after a resume.
"""
import json
import pickle

import pytest
import torch
from hydra import compose, initialize_config_module
from test_training_helpers import save_tiny, tiny_overrides, write_prompts

from specdec.training import DistillTrainer, checkpoint, load_draft, train
from specdec.training.trackers import Tracker
from specdec.training.trainer import CheckpointWarning

COMMON = {"steps": 4, "save_every": 2, "keep_checkpoints": 3,
          "method.responses.on_policy": 0.5, "method.responses.off_policy": "fixed"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    return tmp, save_tiny(tmp / "target"), write_prompts(tmp / "prompts.jsonl")


@pytest.fixture(scope="module")
def straight(tiny):
    """An uninterrupted 4-step run: the reference every resumed run must equal, bit for bit."""
    return train(config(tiny, "straight"))


def config(tiny, out, **extra):
    tmp, target, prompts = tiny
    with initialize_config_module("specdec.conf", version_base=None):
        return compose("train", overrides=tiny_overrides(tmp, target, prompts, output_dir=tmp / out,
                                                         **(COMMON | extra)))


def killed_after(monkeypatch, tiny, out, step):
    """Run until the checkpoint of ``step`` is written, then die as a kill would."""
    save = DistillTrainer.save_checkpoint

    def save_then_die(self, at):
        save(self, at)
        if at == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(DistillTrainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny, out))
    monkeypatch.undo()
    return tiny[0] / out / "checkpoints"


def assert_same_draft(a, b):
    x, _ = load_draft(a.draft_dir)
    y, _ = load_draft(b.draft_dir)
    sx, sy = x.state_dict(), y.state_dict()
    assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)


class Evil:
    """Unpickling this creates ``path``: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_checkpoint_folder_holds_no_pickle(tiny, straight):
    folder = straight.output_dir / "checkpoints" / "step-0000004"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["model.safetensors", "optimizer.json", "optimizer.safetensors", "rng-0.safetensors",
                     "scheduler.json", "trainer_state.json"]
    for name in names:  # JSON or safetensors only: neither starts with a pickle opcode
        assert not (folder / name).read_bytes().startswith(b"\x80"), name
    assert checkpoint.problem(folder) is None


def test_crafted_pickles_never_run_on_resume(tiny, straight, monkeypatch):
    ckpts = killed_after(monkeypatch, tiny, "evil", 2)
    marker = tiny[0] / "evil-ran"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "model.pkl"):
        (ckpts / "step-0000002" / name).write_bytes(pickle.dumps(Evil(marker)))
    # A newer folder in accelerate's old pickle layout: passed over, never read.
    old = ckpts / "step-0000003"
    old.mkdir()
    (old / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Evil(marker)))
    (old / "trainer_state.json").write_text(json.dumps({"step": 3, "before": {}, "after": {}}))
    with pytest.warns(CheckpointWarning, match="step-0000003.*not a specdec checkpoint.*falling back to step-0000002"):
        resumed = train(config(tiny, "evil"))
    assert not marker.exists()
    assert resumed.steps == 4
    assert_same_draft(straight, resumed)


def _empty_state(folder):
    (folder / "trainer_state.json").write_text("")


def _truncate(name):
    def cut(folder):
        path = folder / name
        path.write_bytes(path.read_bytes()[:-7])
    return cut


def _same_size_header(folder):  # a header overwritten by garbage of the same length
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, fault", [
    (_empty_state, "trainer_state.json is missing or unreadable"),
    (_truncate("model.safetensors"), "model.safetensors is"),
    (_truncate("optimizer.safetensors"), "optimizer.safetensors is"),
    (_truncate("optimizer.json"), "optimizer.json is"),
    (_truncate("rng-0.safetensors"), "rng-0.safetensors is"),
    (_same_size_header, "model.safetensors: header does not parse"),
], ids=["empty-state", "model", "optimizer", "optimizer-json", "rng", "header"])
def test_incomplete_latest_checkpoint_falls_back_to_the_previous(tiny, tmp_path, damage, fault):
    out = tmp_path / "run"
    train(config(tiny, out))  # step-2 and step-4 written
    latest = out / "checkpoints" / "step-0000004"
    damage(latest)
    assert fault in checkpoint.problem(latest)
    trainer = DistillTrainer(config(tiny, out))
    with pytest.warns(CheckpointWarning, match=f"step-0000004 is incomplete .*{fault}.*falling back to step-0000002"):
        assert trainer.resume() == 2


def test_damaged_checkpoint_resumes_bit_identical(tiny, straight, monkeypatch):
    ckpts = killed_after(monkeypatch, tiny, "trunc", 2)
    path = ckpts / "step-0000002" / "model.safetensors"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.warns(CheckpointWarning, match="no earlier checkpoint; starting from step 0"):
        restarted = train(config(tiny, "trunc"))  # nothing complete: starts over, and still ends the same
    assert restarted.steps == 4
    assert_same_draft(straight, restarted)
    rows = [json.loads(line)["step"] for line in (restarted.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2, 3, 4]


def test_a_kill_mid_write_leaves_no_checkpoint_under_its_name(tiny, straight, monkeypatch):
    calls = []

    def die_on_second(folder, rank):
        calls.append(folder)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(folder, rank)

    real = checkpoint.save_rng
    monkeypatch.setattr(checkpoint, "save_rng", die_on_second)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny, "midwrite"))
    monkeypatch.undo()
    ckpts = tiny[0] / "midwrite" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".step-0000004.tmp", "step-0000002"]
    resumed = train(config(tiny, "midwrite"))
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002", "step-0000004"]
    assert_same_draft(straight, resumed)


def test_metrics_hold_each_step_once_after_a_resume(tiny, straight, monkeypatch):
    """Killed after logging step 3, past the step-2 checkpoint: the resumed run logs 3 again, once."""
    log = Tracker.log

    def log_then_die(self, metrics, step):
        log(self, metrics, step)
        if step == 3:
            with self.path.open("a") as f:
                f.write('{"step": 3, "train/lo')  # a row the kill cut short
            raise KeyboardInterrupt

    monkeypatch.setattr(Tracker, "log", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny, "metrics"))
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="dropped 1 unreadable row"):
        resumed = train(config(tiny, "metrics"))
    rows = [json.loads(line) for line in (resumed.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    straight_rows = [json.loads(line) for line in (straight.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("train/loss") for r in rows] == [r.get("train/loss") for r in straight_rows]


def test_named_incomplete_checkpoint_is_an_error(tiny, monkeypatch):
    ckpts = killed_after(monkeypatch, tiny, "named", 2)
    (ckpts / "step-0000002" / "trainer_state.json").write_text("{")
    with pytest.raises(ValueError, match="not a complete checkpoint: trainer_state.json"):
        DistillTrainer(config(tiny, "named", resume=str(ckpts / "step-0000002"))).resume()
