# ntrace on a CUDA PyTorch base:
#   docker build -t ntrace .
#   docker run --gpus all -v $PWD:/work ntrace record --device cuda --out /work/run.zarr
# The base is pinned by exact tag; its torch (2.5.1) satisfies ntrace's torch range, so pip
# keeps it and never downloads another torch. Override with --build-arg BASE=... (a tag or
# an image@sha256 digest) to follow a newer CUDA.
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# Build stage: make the wheel, so no build tooling or sources stay in the final image.
FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ntrace ./ntrace
RUN pip wheel --no-deps --no-cache-dir --wheel-dir /wheels .

# Runtime: the wheel with its dependencies (remote stores and Dask included), no pip cache.
FROM ${BASE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/ntrace-*.whl)[remote,dask]" \
    && rm -rf /wheels /root/.cache \
    && ntrace --version
WORKDIR /work
ENTRYPOINT ["ntrace"]
CMD ["--help"]
