# Sourced by the GPU scripts (run_speed_gpu.sh, run_attention_gpu.sh, token_cost_gpu.sh) from the
# repository root: import dtq from this checkout, whatever dtq pip installed (a temporary folder in
# which dtq links here goes first on PYTHONPATH), and stop if it does not.
PKG=$(mktemp -d)
ln -sfn "$PWD" "$PKG/dtq"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
python -c "import dtq, os, sys; sys.exit(os.path.realpath(os.path.dirname(dtq.__file__)) != os.path.realpath('$PWD'))" \
    || { echo "FAILED: dtq does not import from this checkout" >&2; exit 1; }
