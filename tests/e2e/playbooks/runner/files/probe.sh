#!/bin/sh
# A script for the `script` module (tests/e2e/test_runner_parity.py): its arguments and a line
# on each stream.
printf 'argc=%s\n' "$#"
for arg in "$@"; do printf '[%s]\n' "$arg"; done
echo "to stderr: ünï" >&2
