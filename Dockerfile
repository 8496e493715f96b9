# ntrace on a CUDA PyTorch base: `docker run --gpus all -v $PWD:/work IMAGE record ...`
# The base is pinned by exact tag; torch 2.5.1 satisfies ntrace's torch range.
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# Build stage: make the wheel, so no build tooling or sources stay in the final image.
FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ntrace ./ntrace
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${BASE}
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels /root/.cache
WORKDIR /work
ENTRYPOINT ["ntrace"]
CMD ["--help"]
