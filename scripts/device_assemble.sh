# Source on the device machine after the last staging call: assembles a model staged in chunks
# under /tmp/stage, but only once every chunk is there, and keeps the chunks (a failed copy can
# then be redone alone). The zoo checks the assembled file's sha256 when it loads it.
#   source scripts/device_assemble.sh qwen2.5-coder-1.5b-instruct-q4_k_m.gguf 19
name=$1 want=$2
have=$(ls /tmp/stage/"$name".part??? 2>/dev/null | wc -l)
if [ "$have" -ne "$want" ]; then
  echo "device_assemble: $have of $want chunks of $name in /tmp/stage; missing:" >&2
  for i in $(seq 0 $((want - 1))); do
    f=$(printf '/tmp/stage/%s.part%03d' "$name" "$i")
    [ -f "$f" ] || echo "  $f" >&2
  done
  return 1 2>/dev/null || exit 1
fi
cat /tmp/stage/"$name".part??? > /tmp/stage/"$name" && echo "device_assemble: $name, $(stat -c %s /tmp/stage/"$name") bytes"
