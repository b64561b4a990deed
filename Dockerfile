# One image for every Quorum node; docker-compose.yml runs it three times with different configs.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY quorum ./quorum
RUN pip install --no-cache-dir .
COPY nodes ./nodes
EXPOSE 32768 7946/udp 7946/tcp
HEALTHCHECK --interval=5s --timeout=2s --start-period=5s --retries=3 \
  CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:32768/health', timeout=2)"
ENTRYPOINT ["quorum"]
CMD ["node", "--config", "/app/nodes/compose/node-a.toml"]
