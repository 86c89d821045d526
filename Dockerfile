# The gateway image the Helm chart runs (helm/joulegate, image.repository): joulegate with
# llama.cpp and the catalog's GGUF models (the default policy's two, and the 0.5B requantized
# to IQ4_NL, which a policy may name), assembled and sha256-checked at build time, so nothing
# is downloaded or made when a pod starts.
#   docker build -t ghcr.io/joulegate/joulegate:0.1.0 .
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY backends backends
COPY policies policies
# llama-cpp-python compiles here (about 10 minutes on 2 cores).
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[llamacpp,models,redis]"

FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin joulegate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV JOULEGATE_MODEL_DIR=/opt/joulegate/models \
    PYTHONUNBUFFERED=1
RUN joulegate models --assemble
USER 10001
EXPOSE 8080
ENTRYPOINT ["joulegate"]
CMD ["serve", "--host", "0.0.0.0"]
