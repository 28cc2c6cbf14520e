# Image of sqlite_to_databricks_uploader: everything it needs is installed at build time, so the
# container starts without network access (except the route to Databricks) and downloads nothing.
#
#   ./build.sh --registry local --tag dev          (or: docker build -t databricks-uploader .)
#
# BASE_IMAGE: any Debian-based image with Python >= 3.11 (tomllib) and venv; tests build from a
# locally made one because they cannot pull.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with the dependencies of the script's PEP 723 header ----
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# binutils for `strip` below. It stays in this stage: only /opt/venv is copied to the runtime image.
# Not pinned (hadolint DL3008): any Debian binutils strips the same way, and a pin would break with
# every point release of the base image.
# hadolint ignore=DL3008
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends binutils \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY sqlite_to_databricks_uploader.py docker/pep723_requirements.py ./
# Wheels where they exist (no compiler is installed). Then everything the uploader never loads at
# run time leaves the environment (README, "What the image holds", has the sizes). Each cut is
# checked by the imports and the --version run at the end of this step, and by tests/container.
RUN python3 pep723_requirements.py sqlite_to_databricks_uploader.py > requirements.txt \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-compile --prefer-binary -r requirements.txt \
# The installers: nothing installs at run time.
 && /opt/venv/bin/pip uninstall -y -q pip setuptools \
 && site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
# Test suites, C headers, Cython sources, static libraries and type stubs: for building and testing
# the packages, never imported.
 && rm -rf "$site"/pandas/tests "$site"/pyarrow/tests "$site"/pyarrow/conftest.py "$site"/pyarrow/include \
           "$site"/pyarrow/src "$site"/pyarrow/_pyarrow_cpp_tests.*.so \
           "$site"/numpy/*/tests "$site"/numpy/tests "$site"/numpy/_core/include "$site"/numpy/f2py \
 && find /opt/venv \( -name '*.pyi' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' -o -name '*.a' \) -delete \
# pyarrow's Flight (RPC), ORC and Substrait modules: the uploader writes Parquet only. Its S3, GCS,
# Azure and HDFS filesystems: pyarrow.fs imports each in try/except ImportError, and deltalake
# reaches s3://, gs:// and abfss:// through its own (Rust) object store, never through pyarrow's.
# libarrow_s3 (17 MB) is loaded by _s3fs only; libarrow_substrait stays (pyarrow's core links it).
 && rm -f "$site"/pyarrow/libarrow_flight.so* "$site"/pyarrow/libarrow_python_flight.so* \
          "$site"/pyarrow/_flight.*.so "$site"/pyarrow/flight.py \
          "$site"/pyarrow/_orc.*.so "$site"/pyarrow/_dataset_orc.*.so "$site"/pyarrow/orc.py \
          "$site"/pyarrow/_substrait.*.so "$site"/pyarrow/substrait.py \
          "$site"/pyarrow/_s3fs.*.so "$site"/pyarrow/libarrow_s3.so* "$site"/pyarrow/_gcsfs.*.so \
          "$site"/pyarrow/_azurefs.*.so "$site"/pyarrow/_hdfs.*.so \
# Duplicate libraries: wheels cannot hold symlinks, so pyarrow ships libX.so, libX.so.N and
# libX.so.N.M.P as three identical files. The loader asks for libX.so.N (the SONAME); the other two
# become links to it.
 && for soname in "$site"/pyarrow/lib*.so.[0-9]*; do \
      case "$soname" in *.so.*.*) continue ;; esac; \
      for copy in "${soname%.so.*}.so" "$soname".*; do \
        if [ -f "$copy" ] && [ ! -L "$copy" ] && cmp -s "$copy" "$soname"; then \
          ln -sf "$(basename "$soname")" "$copy"; \
        fi; \
      done; \
    done \
# Symbol tables of the shared libraries (most wheels ship them): --strip-unneeded keeps the dynamic
# symbols the loader links against and drops only names for debuggers and profilers. -type f: not
# through the links above (strip would replace a link with a copy). Not the libraries auditwheel
# grafted into <package>.libs/: patchelf rewrote their headers, and strip then writes files the
# loader refuses ("ELF load command address/offset not page-aligned", numpy's OpenBLAS). Every
# library is loaded once afterwards, so a library strip damaged fails the build, not a run.
 && find /opt/venv -type f -name '*.so*' -not -path '*.libs/*' -exec strip --strip-unneeded {} + \
 && /opt/venv/bin/python -c "import ctypes, pathlib, sys; \
[ctypes.CDLL(str(p)) for p in pathlib.Path(sys.prefix).rglob('*.so*') if p.is_file() and not p.is_symlink()]" \
# Bytecode: the root filesystem is read-only at run time, so Python could not write it later;
# compile now (plain .pyc, the level `python` loads). Optimized .pyc (some sdists' builds write
# them) are loaded only under `python -O`, which the image never runs.
 && /opt/venv/bin/python -m compileall -q -j 0 /opt/venv \
 && find /opt/venv -name '*.opt-[12].pyc' -delete \
 && /opt/venv/bin/python -c "import databricks.sql, databricks.sql.exc, databricks.sdk, databricks.sdk.config, \
databricks.sdk.errors, deltalake, deltalake.exceptions, pandas, yaml, pyarrow.parquet, pyarrow.dataset, \
pyarrow.compute, pyarrow.fs, adbc_driver_sqlite.dbapi; from databricks.sdk import WorkspaceClient" \
 && /opt/venv/bin/python sqlite_to_databricks_uploader.py --version

# ---- runtime ----
FROM ${BASE_IMAGE}
ARG VERSION=dev
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="sqlite_to_databricks_uploader" \
      org.opencontainers.image.description="Ships new rows of a SQLite table into a Databricks or Delta Lake table, exactly once." \
      org.opencontainers.image.source="https://github.com/bacalhau-project/examples" \
      org.opencontainers.image.documentation="https://github.com/bacalhau-project/examples#readme" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"

# A fixed non-root uid/gid (10001) that owns /state: give host directories mounted there to this
# uid, or run with --user of the directory's owner.
RUN groupadd --system --gid 10001 uploader \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin uploader \
 && mkdir -p /state /data \
 && chown 10001:10001 /state

COPY --from=build /opt/venv /opt/venv
COPY sqlite_to_databricks_uploader.py /app/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# Relative paths land on the mount points: state_dir ./state is /state, a Delta target
# ./lakehouse/<table> is /lakehouse/<table> (mount a directory there).
WORKDIR /

STOPSIGNAL SIGTERM
# In loop mode the uploader refreshes <state_dir>/heartbeat.json each cycle, after each batch and
# every 30 s while it sleeps or backs off; --healthcheck fails when it is missing or stale.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD ["/opt/venv/bin/python", "/app/sqlite_to_databricks_uploader.py", "--healthcheck"]
ENTRYPOINT ["/opt/venv/bin/python", "/app/sqlite_to_databricks_uploader.py"]
