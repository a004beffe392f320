#!/usr/bin/env bash
# The CUDA (and, with 2+ GPUs, NCCL) paths of mcensemble in one run, under 5 minutes on any GPU
# machine. Run from the repository root after `pip install -e .[test]`:
#
#     bash tests/benchmarks/gpu_check.sh            # writes into a fresh temporary folder
#
# 1. the tests marked @pytest.mark.cuda (curve fits fp32 / bf16 / fp16 with the GradScaler,
#    evaluation and BatchNorm under autocast, EnsembleModel .to('cuda') / .half(), lazy loading,
#    pinned loaders, channels_last, `build --device cuda --precision fp16`);
# 2. the CLI end to end on cuda:0: build (bf16, --save-dtype bf16, workers, channels_last),
#    eval, scan, an unavailable device index refused with one line;
# 3. with 2+ GPUs: torchrun, 2 processes, NCCL: build --device cuda (each process its own GPU).
# Exits non-zero at the first failure; prints PASS at the end.
set -euo pipefail

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch; nothing to check here" >&2
    exit 2
fi
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
REPO=$(pwd)
WORK=$(mktemp -d -t mce-gpu-check-XXXXXX)
echo "gpu_check: $NGPU GPU(s): $(python -c "import torch; print(torch.cuda.get_device_name(0))"); work folder $WORK"
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=4
SECONDS=0

echo "== 1. pytest -m cuda"
timeout 180 python -m pytest -q -p no:cacheprovider -m cuda -rs "$REPO/tests/test_precision.py"

echo "== 2. CLI on cuda:0"
cd "$WORK"
timeout 120 python - <<'PY'
from mcensemble.checkpoints import save_checkpoint
from mcensemble.models import ModelSpec, create_model
import torch
for seed in (0, 1):  # two random tiny CNNs are enough for the paths (no training needed)
    torch.manual_seed(seed)
    net = create_model(ModelSpec(arch="mce_digits_cnn", kwargs={"num_classes": 10, "in_chans": 1, "widths": [8, 16]}))
    save_checkpoint(net.state_dict(), f"cnn-{seed}.safetensors",
                    metadata={"arch": "mce_digits_cnn", "num_classes": 10, "in_chans": 1, "model_args": {"widths": [8, 16]}})
PY
timeout 120 mcensemble build cnn-0.safetensors cnn-1.safetensors --device cuda --data digits,train=600 --val-data digits \
    --epochs 2 --members 3 --candidates 5 --no-packed --precision bf16 --save-dtype bf16 --workers 2 \
    --channels-last --out ens.safetensors --report build.json
timeout 60 mcensemble eval ens.safetensors --device cuda --data digits --precision fp16 --report eval.json
timeout 60 mcensemble scan cnn-0.safetensors cnn-1.safetensors --device cuda --data digits --points 5 \
    --precision bf16 --report scan.json
python - <<'PY'
import json
b, e = json.load(open("build.json")), json.load(open("eval.json"))
assert b["curve"]["precision"] == "bf16", b["curve"]
assert e["ensemble"]["acc"] > 0.1, e["ensemble"]
print("build/eval/scan on cuda: ok; ensemble acc", round(e["ensemble"]["acc"], 4))
PY
if mcensemble eval ens.safetensors --device "cuda:$NGPU" --data digits > bad.txt 2>&1; then
    echo "gpu_check: --device cuda:$NGPU was accepted" >&2; exit 1
fi
grep -q "CUDA device" bad.txt && ! grep -q Traceback bad.txt
echo "unavailable device refused in one line: $(grep -m1 Error bad.txt)"

if [ "$NGPU" -ge 2 ]; then
    echo "== 3. torchrun, 2 processes, NCCL"
    timeout 180 python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29533 \
        -m mcensemble build cnn-0.safetensors cnn-1.safetensors --device cuda --data digits --val-data digits \
        --epochs 2 --members 2 --exact-members --candidates 3 --precision fp16 --out ens2.safetensors \
        --report build2.json --checkpoint-dir ck
    python -c "import json; r = json.load(open('build2.json')); assert r['world_size'] == 2, r['world_size']; print('nccl build: ok')"
else
    echo "== 3. skipped: NCCL needs 2 GPUs, this machine has $NGPU"
fi
echo "gpu_check: PASS in ${SECONDS}s ($WORK)"
