# GPU image: docker build -t dt-toolkit . && docker run --gpus all -it -v $PWD/data:/workspace/data \
#     -v $PWD/checkpoints:/workspace/checkpoints -v $PWD/models:/workspace/models dt-toolkit bash
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
