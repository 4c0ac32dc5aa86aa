# The fedsb app image: the official Flower SuperExec image plus torch and the fedsb project, so the
# SuperExecs in docker-compose.yml can run fedsb's ServerApp and ClientApps (process isolation).
# Runtime dependency installation stays off: everything the app imports is installed here.
#
#   docker compose build                                   # CPU torch (default)
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128   # GPU
#   docker build --build-arg TORCH_WHEEL=http://127.0.0.1:8765/torch-...whl .   # a given torch wheel
ARG FLWR_VERSION=1.41.0
FROM flwr/superexec:${FLWR_VERSION}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# A torch wheel (URL or path) installed instead of torch==TORCH_VERSION from TORCH_INDEX_URL; its own
# dependencies come from the default index. scripts/build-local-images.sh (the test harness) serves
# the local CPU wheel on 127.0.0.1 and passes it here.
ARG TORCH_WHEEL=

# Writable mount points for the compose volumes: the image runs as `app` (uid 49999), and a new
# named volume takes the owner of the directory it is mounted on. /app/src too: WORKDIR would
# create it owned by root, and the build writes there (sed -i, pip's build files).
USER root
RUN mkdir -p /data/hf /runs /app/src && chown app:app /data/hf /runs /app/src
USER app

# torch first and on its own layer: the CPU build unless TORCH_INDEX_URL or TORCH_WHEEL says otherwise.
RUN if [ -n "${TORCH_WHEEL}" ]; then python -m pip install --no-cache-dir "${TORCH_WHEEL}"; \
    else python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; fi

# The project's dependencies, on their own layer: rebuilt only when pyproject.toml changes, not on
# every code change. flwr is already in the image at the pinned version; the [simulation] extra
# (Ray) is not needed by a deployment, so it is dropped from the requirement. (tomli: a flwr
# dependency, there whatever the image's Python.)
WORKDIR /app/src
COPY --chown=app:app pyproject.toml .
RUN sed -i 's/"flwr\[simulation\]==/"flwr==/' pyproject.toml \
    && python -c "import tomli; print('\n'.join(tomli.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
       > /tmp/requirements.txt \
    && python -m pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt

# The project itself.
COPY --chown=app:app . .
RUN sed -i 's/"flwr\[simulation\]==/"flwr==/' pyproject.toml \
    && python -m pip install --no-cache-dir --no-deps . \
    && python -m pip check \
    && python -c "import flwr, torch, fedsb; print('flwr', flwr.__version__, 'torch', torch.__version__)"

WORKDIR /app
ENV HF_HOME=/data/hf
ENTRYPOINT ["flower-superexec"]
