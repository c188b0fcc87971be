"""The README's Python example runs as written (on a tiny checkpoint)."""

import os
import re

import torch

from training.checkpoint import save_training_state
from training.networks import build_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_example():
    text = open(os.path.join(ROOT, 'README.md')).read()
    blocks = re.findall(r'```python\n(.*?)```', text, flags=re.S)
    examples = [b for b in blocks if 'edm_sampler' in b]
    assert len(examples) == 1, 'expected one sampling example in the README'
    return examples[0]


def test_readme_sampling_example_runs(tmp_path):
    torch.manual_seed(0)
    net = build_network(dict(class_name='EDMPrecond', img_resolution=8, img_channels=3, label_dim=0, D=128.0,
                             model_type='SongUNet', model_channels=16, channel_mult=[1, 1], num_blocks=1,
                             attn_resolutions=[]))
    path = tmp_path / 'training-state-200000.pt'
    save_training_state(str(path), network_config=net.config, net_state=net.state_dict(),
                        ema_state=net.state_dict(), optimizer_state={}, progress={'cur_nimg': 0})
    code = _readme_example().replace("'training-state-200000.pt'", repr(str(path)))
    namespace = {}
    exec(compile(code, 'README.md', 'exec'), namespace)
    images = namespace['images']
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float64
    assert torch.isfinite(images).all()
    assert namespace['net'].D == 128.0
