#!/usr/bin/env bash
# A decode instance: receives the KV straight into its own blocks, then generates.
#   MODEL=Qwen/Qwen2.5-7B-Instruct CUDA_VISIBLE_DEVICES=1 examples/launch_decode.sh
# Settings: see examples/_instance.sh.
KV_ROLE=kv_consumer
PORT=${PORT:-8200}
# shellcheck source=examples/_instance.sh
source "$(dirname "$0")/_instance.sh"
