# The same install steps as the README (`make setup`); the default command serves a bundle mounted
# or trained into /srv/bundles/default, with the online learner beside it.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make redis-server \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /srv/feedrank
COPY . .
RUN make setup PYTHON=python3
ENV PATH=/srv/feedrank/.venv/bin:$PATH
EXPOSE 50051 9095
CMD ["feedrank", "serve", "--host", "[::]", "--port", "50051", "--metrics-port", "9095", \
     "--model-dir", "/srv/bundles", "--eventlog-dir", "/srv/state/events", \
     "--learner-state-dir", "/srv/state/learner"]
