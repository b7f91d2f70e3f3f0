#!/usr/bin/env sh
# Puts promtool (Prometheus' rule checker, a Go binary: no PyPI wheel carries it) at $1, for the
# tests of deploy/prometheus. Order: a promtool already on PATH; else the one inside Debian's
# `prometheus` package, downloaded with `apt-get download` and unpacked (nothing is installed
# system-wide and no Prometheus server is started). Never fails the build: without promtool the
# rule tests skip, naming this script, except under CI=true, where they fail.
set -u
target=$1
case $target in /*) ;; *) target=$PWD/$target ;; esac
if [ -x "$target" ]; then
    exit 0
fi
mkdir -p "$(dirname "$target")"
found=$(command -v promtool 2>/dev/null || true)
if [ -n "$found" ]; then
    ln -sf "$found" "$target"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    echo "get-promtool: no promtool on PATH and no apt-get here: the rule tests will skip" >&2
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 0
if ! apt-get download prometheus >/dev/null 2>&1; then
    # A new machine may have no package lists yet; only root can fetch them.
    if [ "$(id -u)" = 0 ]; then
        apt-get update >/dev/null 2>&1 || true
    fi
    apt-get download prometheus >/dev/null 2>&1 || {
        echo "get-promtool: apt-get download prometheus failed: the rule tests will skip" >&2
        exit 0
    }
fi
dpkg-deb -x prometheus_*.deb unpacked && cp unpacked/usr/bin/promtool "$target" \
    && echo "get-promtool: $("$target" --version 2>&1 | head -n 1)" >&2
exit 0
