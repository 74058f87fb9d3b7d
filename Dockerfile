# lnscope server image: the wheel, installed as users install it. CUDA builds of torch come from
# PyTorch's index (TORCH_INDEX); the embedded tiny trio is copied in (docker-compose mounts ./models over it).
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY analysis ./analysis
COPY server ./server
COPY frontend ./frontend
RUN pip wheel --no-cache-dir --no-deps -w /dist .

FROM python:3.11-slim
ARG TORCH_SPEC="torch>=2.6"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cu124"
# "[cluster]" adds Ray and the PostgreSQL driver (docker compose --profile cluster builds with it)
ARG EXTRAS=""
ENV PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    LNSCOPE_DATA_DIR=/data \
    LNSCOPE_MODELS_DIR=/app/models \
    LNSCOPE_HOST=0.0.0.0 \
    LNSCOPE_PORT=8000

WORKDIR /app
RUN pip install --no-cache-dir "$TORCH_SPEC" --index-url "$TORCH_INDEX"
COPY --from=wheel /dist /dist
RUN pip install --no-cache-dir "$(ls /dist/lnscope-*.whl)$EXTRAS" && rm -rf /dist
COPY models ./models

EXPOSE 8000
CMD ["lnscope", "serve"]
