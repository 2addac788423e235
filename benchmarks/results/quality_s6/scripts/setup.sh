#!/usr/bin/env bash
# Session 6 GPU set-up (one call per staged part): copy the tree to /tmp/repo, the package link,
# the staged reference checkpoint / Fashion-MNIST / FID helper, and sageattention into /tmp/site.
set -e
rm -rf /tmp/repo && mkdir -p /tmp/repo /tmp/pkg /tmp/stage /tmp/site
cp -r . /tmp/repo/ && rm -rf /tmp/repo/.stage
ln -sfn /tmp/repo /tmp/pkg/dtq
for p in .stage/part0*; do [ -f "$p" ] && cp "$p" /tmp/stage/; done
ls .stage/wheels/*.whl >/dev/null 2>&1 && pip install -q --no-deps --target /tmp/site .stage/wheels/*.whl
if [ -f /tmp/stage/part00 ] && [ -f /tmp/stage/part01 ] && [ -f /tmp/stage/part02 ] && [ ! -d /tmp/stage/ref ]; then
  (cd /tmp/stage && cat part00 part01 part02 | tar x && rm part00 part01 part02)
fi
ls /tmp/stage
