# borderflow worker image: `docker compose` runs it as migrate, worker and generator.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# Dependencies first, listed from pyproject.toml alone, so editing the source does not
# re-download them. Every dependency ships manylinux wheels: no compiler in the image.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself (packages, migrations and FX tables as package data).
COPY . .
RUN pip install --no-deps . \
    && cd / && rm -rf /src

# Run unprivileged. Faust keeps its data directory (`<app_id>-data/`) in the working
# directory, and the settings' stack_dir would otherwise point inside site-packages.
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/borderflow borderflow
USER borderflow
WORKDIR /var/lib/borderflow
ENV BORDERFLOW_STACK_DIR=/var/lib/borderflow/.stack

ENTRYPOINT ["borderflow"]
CMD ["worker"]
