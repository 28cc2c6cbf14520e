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
WORKDIR /src
COPY sqlite_to_databricks_uploader.py docker/pep723_requirements.py ./
# Wheels where they exist (no compiler is installed: thrift, which ships only sources, installs
# as pure Python). Then pip and setuptools leave the environment; test suites, headers, stubs and
# pyarrow's Flight libraries (~33 MB, unused) are dropped; everything is compiled to
# bytecode now, because the root filesystem is read-only at run time.
RUN python3 pep723_requirements.py sqlite_to_databricks_uploader.py > requirements.txt \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-compile --prefer-binary -r requirements.txt \
 && /opt/venv/bin/pip uninstall -y -q pip setuptools \
 && site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
 && rm -rf "$site"/pandas/tests "$site"/pyarrow/tests "$site"/pyarrow/include "$site"/pyarrow/src \
           "$site"/numpy/*/tests "$site"/numpy/tests "$site"/numpy/_core/include "$site"/numpy/f2py \
           "$site"/pyarrow/*.pyx "$site"/pyarrow/*.pxd "$site"/pyarrow/*.pxi \
           "$site"/pyarrow/libarrow_flight.so* "$site"/pyarrow/libarrow_python_flight.so* \
           "$site"/pyarrow/_flight.*.so "$site"/pyarrow/flight.py \
 && find /opt/venv -name '*.pyi' -delete \
 && /opt/venv/bin/python -m compileall -q -j 0 /opt/venv \
 && /opt/venv/bin/python -c "import databricks.sql, databricks.sdk, deltalake, pandas, yaml, pyarrow.parquet, pyarrow.dataset, pyarrow.compute" \
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
