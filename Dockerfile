# The pipeline's GPU image: TensorFlow with its CUDA 12 and cuDNN 9 wheels, DVC with S3,
# MLflow, and the VGG16 ImageNet weights baked in, run as the project's own user. It holds
# the environment, not the code: mount a checkout of the repository at /workspace.
# docs/remote-runners.md has the whole story.
#
#   docker build -t dogs-vs-cats-gpu --build-arg UID="$(id -u)" --build-arg GID="$(id -g)" .
#   docker run --rm --gpus all -v "$PWD:/workspace" dogs-vs-cats-gpu            # dvc repro
#   docker run --rm --gpus all -v "$PWD:/workspace" dogs-vs-cats-gpu dvc exp run -S head.units=512
#
# Not tensorflow/tensorflow:latest-gpu: its cuDNN is older than current TensorFlow needs
# (tensorflow/build#221). The CUDA `base` image only brings what the NVIDIA container
# toolkit needs (the driver is the host's); the CUDA libraries TensorFlow loads are the
# nvidia-* wheels pinned below, at the versions TensorFlow 2.21 was built against
# (CUDA 12.5, cuDNN 9.3), so the base image's CUDA version matches them.
FROM nvidia/cuda:12.5.1-base-ubuntu24.04

# The owner of the checkout that will be mounted, so what the pipeline writes stays theirs.
ARG UID=1000
ARG GID=1000

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    KERAS_HOME=/opt/keras \
    DVC_NO_ANALYTICS=1 \
    TF_CPP_MIN_LOG_LEVEL=1

# Ubuntu 24.04's Python 3.12, and git, which DVC needs. Left unpinned on purpose: Ubuntu
# replaces package versions in its archive, so pinned ones stop installing within weeks;
# the base image tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory /workspace \
    && python3 -m venv "$VIRTUAL_ENV"

# The versions CI tests (requirements.lock), plus the GPU and S3 pieces it does not hold.
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir -r /tmp/requirements.lock \
        "tensorflow[and-cuda]==2.21.0" \
        "dvc[s3]==3.67.1" \
        "mlflow==3.17.2" \
        nvidia-cublas-cu12==12.5.3.2 \
        nvidia-cuda-cupti-cu12==12.5.82 \
        nvidia-cuda-nvcc-cu12==12.5.82 \
        nvidia-cuda-nvrtc-cu12==12.5.82 \
        nvidia-cuda-runtime-cu12==12.5.82 \
        nvidia-cudnn-cu12==9.3.0.75 \
        nvidia-cufft-cu12==11.2.3.61 \
        nvidia-curand-cu12==10.3.6.82 \
        nvidia-cusolver-cu12==11.6.3.83 \
        nvidia-cusparse-cu12==12.5.1.3 \
        nvidia-nccl-cu12==2.27.7 \
        nvidia-nvjitlink-cu12==12.5.82 \
        nvidia-ml-py==13.615.71 \
        dvc-s3==3.3.0 \
        s3fs==2026.9.0 \
        aiobotocore==3.10.0 \
        botocore==1.43.117 \
        aioitertools==0.13.0 \
        jmespath==1.1.0 \
    && rm /tmp/requirements.lock

# XLA (Keras compiles with jit_compile="auto") looks for ptxas and libdevice in a CUDA
# toolkit folder; here they come from the nvidia-cuda-nvcc-cu12 wheel.
ENV XLA_FLAGS=--xla_gpu_cuda_data_dir=/opt/venv/lib/python3.12/site-packages/nvidia/cuda_nvcc \
    PATH=/opt/venv/lib/python3.12/site-packages/nvidia/cuda_nvcc/bin:$PATH

# The VGG16 ImageNet weights (59 MB) where Keras looks for them, checked against Keras' own
# hash, so runs never download them (features.weights: imagenet). Only VGG16's: other
# backbones download theirs at run time.
RUN python -c "import keras; keras.applications.VGG16(include_top=False, weights='imagenet')"

# Ubuntu's images ship a user `ubuntu` as UID 1000; the project's user takes its place.
# It owns KERAS_HOME: Keras looks for the weights in /tmp/.keras instead, and downloads
# them again, when KERAS_HOME is not writable.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && groupadd --gid "$GID" --non-unique app \
    && useradd --uid "$UID" --gid "$GID" --non-unique --create-home --shell /bin/bash app \
    && mkdir -p /workspace \
    && chown app:app /workspace \
    && chown -R app:app "$KERAS_HOME"

# Numeric, so Kubernetes' runAsNonRoot (Actions Runner Controller pods) can check it.
USER ${UID}:${GID}
WORKDIR /workspace
CMD ["dvc", "repro"]
