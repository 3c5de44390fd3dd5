#!/bin/sh
# Build the kvd Debian package: `make deb` (or packaging/build-deb.sh OUTDIR).
#
# Layout of the package (see packaging/README.md for the reasons):
#   /opt/kvd/                      a virtualenv of Debian's /usr/bin/python3 holding kvd
#                                  and its dependencies (built in place under the staging
#                                  root, so nothing is relocated except the venv's own paths)
#   /usr/bin/kvd, /usr/bin/kvctl   symlinks to the venv's console scripts
#   /etc/kvd/kvd.toml              conffile
#   /usr/lib/systemd/system/kvd.service, /usr/lib/sysusers.d/kvd.conf
#   /usr/share/man/man{1,5,8}/     kvctl.1, kvd.toml.5, kvd.8
#   /usr/share/bash-completion/completions/kvctl
#   /usr/share/doc/kvd/            copyright, README.md.gz, protocol.md.gz, changelog.Debian.gz
#   /usr/share/kvd/                grafana-dashboard.json
#
# Needs: the dev virtualenv (.venv, for pip), /usr/bin/python3 (3.11 or later), dpkg-deb,
# gzip. The package depends on the python3 of that minor version: the venv's compiled
# extensions (plyvel, msgpack, pydantic-core) are built for its ABI (packaging/README.md).
set -eu
# The package's modes are its own, not the builder's umask: under 077 (a test process that
# ran a node in-process, kvd.node.data_dir) the control directory came out 0700, which
# dpkg-deb refuses.
umask 022

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${1:-$ROOT/build/deb}" && cd "${1:-$ROOT/build/deb}" && pwd)
PIP="${PIP:-$ROOT/.venv/bin/pip}"
SYSTEM_PYTHON="${SYSTEM_PYTHON:-/usr/bin/python3}"
PREFIX=/opt/kvd
REVISION=1

VERSION=$("$SYSTEM_PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$ROOT/pyproject.toml")
PY_MINOR=$("$SYSTEM_PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "kvd needs Python 3.11+"; print(sys.version_info.minor)')
PY_DEPENDS="python3 (>= 3.$PY_MINOR), python3 (<< 3.$((PY_MINOR + 1)))"
ARCH=$(dpkg --print-architecture)
STAGE="$OUT/stage"
DEB="$OUT/kvd_${VERSION}-${REVISION}_${ARCH}.deb"
started=$(date +%s)

rm -rf "$STAGE" "$OUT/wheels"
mkdir -p "$STAGE/DEBIAN" "$OUT/wheels"

# 1. The project's wheel (dependencies come from the index, as wheels).
"$PIP" wheel --quiet --no-deps --wheel-dir "$OUT/wheels" "$ROOT"

# 2. A virtualenv at its final path inside the staging root. Symlinks to Debian's
#    interpreter (not --copies): python3.11 security updates then reach kvd too.
"$SYSTEM_PYTHON" -m venv --without-pip "$STAGE$PREFIX"
"$PIP" --python "$STAGE$PREFIX/bin/python" install --quiet --no-compile \
    --disable-pip-version-check --no-warn-script-location "$OUT"/wheels/kvd-*.whl

# 3. Make the venv's paths the installed ones: script shebangs, activate scripts,
#    pyvenv.cfg; then byte-compile with the final paths (tracebacks name /opt/kvd).
for f in "$STAGE$PREFIX/bin/"* "$STAGE$PREFIX/pyvenv.cfg"; do
    if [ -f "$f" ] && [ ! -L "$f" ] && grep -q "$STAGE" "$f" 2>/dev/null; then
        sed -i "s#$STAGE$PREFIX#$PREFIX#g" "$f"
    fi
done
# Only kvd's commands and the interpreter links: the console scripts of dependencies
# (pygmentize, typer, markdown-it, ...) and the activate scripts are no part of kvd.
find "$STAGE$PREFIX/bin" -mindepth 1 ! -name kvd ! -name kvctl ! -name 'python*' -delete
find "$STAGE$PREFIX" -name direct_url.json -path '*kvd-*' -delete
"$SYSTEM_PYTHON" -m compileall -q -j0 --invalidation-mode unchecked-hash \
    -s "$STAGE" -p / "$STAGE$PREFIX/lib" >/dev/null
if grep -rlI "$STAGE" "$STAGE$PREFIX" | grep -q .; then
    echo "build-deb: staging path left in:" >&2
    grep -rlI "$STAGE" "$STAGE$PREFIX" >&2
    exit 1
fi

# 4. Commands, config, unit, account, man pages, completion, docs.
install -d "$STAGE/usr/bin" "$STAGE/etc/kvd" "$STAGE/usr/lib/systemd/system" \
    "$STAGE/usr/lib/sysusers.d" "$STAGE/usr/share/man/man1" "$STAGE/usr/share/man/man5" \
    "$STAGE/usr/share/man/man8" "$STAGE/usr/share/bash-completion/completions" \
    "$STAGE/usr/share/doc/kvd" "$STAGE/usr/share/kvd"
ln -s "$PREFIX/bin/kvd" "$STAGE/usr/bin/kvd"
ln -s "$PREFIX/bin/kvctl" "$STAGE/usr/bin/kvctl"
install -m 0644 "$ROOT/packaging/kvd.toml" "$STAGE/etc/kvd/kvd.toml"
install -m 0644 "$ROOT/systemd/kvd.service" "$STAGE/usr/lib/systemd/system/kvd.service"
install -m 0644 "$ROOT/systemd/kvd.sysusers" "$STAGE/usr/lib/sysusers.d/kvd.conf"
for page in kvctl.1 kvd.toml.5 kvd.8; do
    section=${page##*.}
    gzip -9n < "$ROOT/man/$page" > "$STAGE/usr/share/man/man$section/$page.gz"
done
install -m 0644 "$ROOT/packaging/kvctl.bash-completion" \
    "$STAGE/usr/share/bash-completion/completions/kvctl"
install -m 0644 "$ROOT/packaging/copyright" "$STAGE/usr/share/doc/kvd/copyright"
for doc in README.md docs/protocol.md; do  # Debian policy 12.3: docs are compressed
    gzip -9n < "$ROOT/$doc" > "$STAGE/usr/share/doc/kvd/$(basename "$doc").gz"
done
install -m 0644 "$ROOT/packaging/grafana-dashboard.json" "$STAGE/usr/share/kvd/"
printf 'kvd (%s-%s) unstable; urgency=medium\n\n  * Built from the kvd source tree.\n\n -- kvd maintainers <kvd@localhost>  %s\n' \
    "$VERSION" "$REVISION" "$(date -R -d @"${SOURCE_DATE_EPOCH:-$started}")" \
    | gzip -9n > "$STAGE/usr/share/doc/kvd/changelog.Debian.gz"

# 5. Control files.
for script in postinst prerm postrm; do
    install -m 0755 "$ROOT/packaging/$script" "$STAGE/DEBIAN/$script"
done
echo /etc/kvd/kvd.toml > "$STAGE/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
sed -e "s/@VERSION@/$VERSION-$REVISION/" -e "s/@ARCH@/$ARCH/" -e "s/@SIZE@/$size/" \
    -e "s/@PYTHON@/$PY_DEPENDS/" \
    "$ROOT/packaging/control.in" > "$STAGE/DEBIAN/control"
(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -print0 | sort -z \
    | xargs -0 md5sum | sed 's# \./# #') > "$STAGE/DEBIAN/md5sums"

# xz -z2: 9 MiB in ~3 s; -z6 saves 1 MiB for 25 s more.
dpkg-deb --root-owner-group ${DEB_COMPRESS:--Zxz -z2} --build "$STAGE" "$DEB" >/dev/null
rm -rf "$STAGE"
echo "$DEB ($(du -k "$DEB" | cut -f1) KiB, $(( $(date +%s) - started )) s)"
