FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY sql ./sql
RUN pip install --no-cache-dir . && useradd --system taskstream
USER taskstream
EXPOSE 8000
CMD ["taskstream", "serve", "--host", "0.0.0.0", "--port", "8000"]
