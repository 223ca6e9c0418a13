#!/bin/sh
# A stand-in for a build: prints its progress line by line, a warning on stderr.
echo "building on $(hostname) as $(id -un) in $PWD"
for step in fetch configure compile test package; do
    echo "step: $step"
    sleep "${MARCO_STEP_SECONDS:-0.3}"
done
echo "note: this line goes to stderr" >&2
echo "done"
