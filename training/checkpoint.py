"""Training checkpoints with no pickle in them: safetensors for tensors, JSON for everything else.

A checkpoint folder ``checkpoints/step-NNNNNNN/`` holds:

    model.safetensors        the trained module's state dict
    optimizer.safetensors    the optimizer's per-parameter tensors, keyed "<param index>/<name>"
    optimizer.json           its param groups and any non-tensor per-parameter values
    scheduler.json           the learning-rate scheduler's state dict
    rng-<rank>.safetensors   one per process: torch CPU/CUDA and numpy RNG states (Python's in its metadata)
    trainer_state.json       step, evaluations, world size and the byte size of every file above

Writing goes to a hidden ``.step-NNNNNNN.tmp`` folder that is renamed into place once
``trainer_state.json`` (written last) is on disk, so a kill leaves no half-written folder under a
checkpoint's name. Reading first checks a folder (`problem`): the state file parses, every listed
file has its recorded size, every safetensors header parses and covers its file. Nothing here
calls ``torch.load`` or unpickles, so a ``.pkl`` dropped into a checkpoint folder is never read.

This module knows torch, safetensors and the state dicts of an optimizer and a scheduler; the
trainer decides which process writes what and when.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

FORMAT = 1
STATE = "trainer_state.json"


def temp_dir(final: Path) -> Path:
    """The hidden folder a checkpoint is written in before it is renamed to ``final``."""
    return final.with_name(f".{final.name}.tmp")


def save_shared(folder: Path, model: torch.nn.Module, optimizer, scheduler) -> None:
    """Write the parts every process shares: model, optimizer and scheduler (main process)."""
    save_model(model, str(folder / "model.safetensors"))
    state = optimizer.state_dict()
    tensors, values = {}, {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                values.setdefault(str(index), {})[name] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    _write_json(folder / "optimizer.json", {"param_groups": state["param_groups"], "values": values})
    _write_json(folder / "scheduler.json", scheduler.state_dict())


def save_rng(folder: Path, rank: int) -> None:
    """Write this process's RNG states (every process)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"python": json.dumps(random.getstate()), "numpy": json.dumps([name, pos, has_gauss, cached])}
    save_file(tensors, str(folder / f"rng-{rank}.safetensors"), metadata=meta)


def seal(folder: Path, final: Path, state: dict) -> None:
    """Record every file's size in ``trainer_state.json``, then rename ``folder`` to ``final``."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.name != STATE}
    _write_json(folder / STATE, {"format": FORMAT, **state, "files": files})
    if final.exists():  # an incomplete or stale folder of the same step, from an earlier attempt
        shutil.rmtree(final)
    os.rename(folder, final)


def problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None if it is one."""
    try:
        state = json.loads((folder / STATE).read_text())
    except (OSError, ValueError) as err:
        return f"{STATE} is missing or unreadable ({type(err).__name__}: {err})"
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("files"), dict):
        return f"{STATE} is not a specdec checkpoint state (format {FORMAT} with a file list)"
    counts = [state.get(k) for k in ("step", "accelerator_step", "world_size")]
    if not all(type(n) is int and n >= 0 for n in counts) or not state["world_size"]:
        return f"{STATE} has no valid step, accelerator_step and world_size"
    if not all(isinstance(state.get(k), dict) for k in ("before", "after")):
        return f"{STATE} has no evaluations (before, after)"
    needed = {"model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
              *(f"rng-{r}.safetensors" for r in range(state["world_size"]))}
    if missing := sorted(needed - set(state["files"])):
        return f"{STATE} lists no {', '.join(missing)}"
    for name, size in state["files"].items():
        if Path(name).name != name or name.startswith(".") or type(size) is not int:
            return f"{STATE} lists a file {name!r} of size {size!r}: not a plain file name and size"
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            got = f"{path.stat().st_size:,} bytes" if path.is_file() else "missing"
            return f"{name} is {got}; {size:,} bytes were written"
        bad = _safetensors_problem(path) if name.endswith(".safetensors") else _json_problem(path)
        if bad:
            return f"{name}: {bad}"
    return None


def world_size(folder: Path) -> int:
    """How many processes wrote a checked checkpoint."""
    return json.loads((folder / STATE).read_text())["world_size"]


def load(folder: Path, model: torch.nn.Module, optimizer, scheduler, rank: int) -> dict:
    """Load a checked checkpoint into ``model``, ``optimizer``, ``scheduler`` and this process's
    RNGs; returns the trainer state (step, evaluations, ...)."""
    state = json.loads((folder / STATE).read_text())
    load_model(model, str(folder / "model.safetensors"), strict=True, device=str(_device(model)))
    saved = json.loads((folder / "optimizer.json").read_text())
    per_param: dict[int, dict] = {int(i): dict(v) for i, v in saved["values"].items()}
    for key, tensor in load_file(str(folder / "optimizer.safetensors")).items():
        index, name = key.split("/", 1)
        per_param.setdefault(int(index), {})[name] = tensor
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in saved["param_groups"]]  # JSON turned tuples (betas) into lists
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
    _load_rng(folder / f"rng-{rank}.safetensors")
    return state


def _load_rng(path: Path) -> None:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    version, keys, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(keys), gauss))
    name, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file's header must parse and its tensors must end exactly at the file's end."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "shorter than a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"header of {length:,} bytes does not fit in {size:,}"
        try:
            header = json.loads(f.read(length))
        except ValueError as err:
            return f"header does not parse ({err})"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if 8 + length + max(ends, default=0) != size:
        return f"tensors end at byte {8 + length + max(ends, default=0):,} of {size:,}"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except ValueError as err:
        return f"does not parse ({err})"
    return None


def _write_json(path: Path, value) -> None:
    with path.open("w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())


def _device(model: torch.nn.Module) -> torch.device:
    return next(iter(model.state_dict().values()), torch.empty(0)).device
