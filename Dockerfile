# GPU image: docker build -t dt-toolkit . && docker run --gpus all -it -v $PWD:/workspace dt-toolkit bash
# (the project folder mounted over the image's copy, so every output, wandb/ included, stays on the host)
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV DEBIAN_FRONTEND=noninteractive \
    MUJOCO_GL=egl \
    PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends libegl1 libgl1 libglib2.0-0 git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
COPY pyproject.toml README.md ./
COPY decision_transformer ./decision_transformer
RUN pip install --no-cache-dir -e ".[test,plots]"
COPY . .

CMD ["python", "experiment.py", "--help"]
