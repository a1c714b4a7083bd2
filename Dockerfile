# CUDA image for clusters: the same pinned torch (CUDA build), DeepSpeed with its ops
# JIT-built on first use, and the optional GPU extras as separate layers.
#   docker build -t neox-l2e .                          # core
#   docker build --build-arg WITH_FLASH_ATTN=1 -t neox-l2e:flash .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev git build-essential ninja-build pdsh openssh-client libaio-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /workspace/neox-l2e
COPY requirements.txt constraints.txt ./
# torch first, from the CUDA wheel index, at the version requirements.txt pins.
RUN pip install --upgrade pip \
 && pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 \
 && pip install -c constraints.txt -r requirements.txt

# Optional GPU extras: nothing requires them; the model falls back to SDPA attention.
ARG WITH_FLASH_ATTN=0
RUN if [ "$WITH_FLASH_ATTN" = "1" ]; then pip install -c constraints.txt flash-attn --no-build-isolation; fi
ARG WITH_APEX=0
RUN if [ "$WITH_APEX" = "1" ]; then \
      pip install -c constraints.txt --no-build-isolation \
        --config-settings "--build-option=--cpp_ext" --config-settings "--build-option=--cuda_ext" \
        git+https://github.com/NVIDIA/apex.git; fi

COPY . .
RUN pip install --no-deps --no-build-isolation -e .
CMD ["python", "deepy.py", "train.py", "configs/pythia/70M.yml", "configs/local_setup.yml"]
