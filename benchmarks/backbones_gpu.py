"""GPU check of the backbones: equality with timm's DINO ViT-S/16 on shared random weights, and fp32/bf16 throughput at 473."""

import time, torch, timm
from umtfss.backbones import build_backbone
from umtfss.backbones.checkpoints import load_into
# 1) numerical equivalence with timm's DINO ViT-S/16 architecture (random weights, 224 input)
ref = timm.create_model('vit_small_patch16_224.dino', pretrained=False, num_classes=0).eval()
mine = build_backbone('dino-vits16', random_init=True)
load_into(mine, {k: v for k, v in ref.state_dict().items() if not k.startswith('head')}, 'timm')
x = torch.rand(2, 3, 224, 224)
mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1); std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
with torch.no_grad():
    a = ref.forward_features((x - mean) / std)[:, 1:]
    b = mine(x)['last'].flatten(2).transpose(1, 2)
print('timm vs mine max abs diff', (a - b).abs().max().item(), 'scale', a.abs().max().item())
# 2) CUDA fp32 vs bf16 autocast, batch 8 at 473
dev = 'cuda'
for name, stride in [('resnet50-imagenet', 8), ('resnet50-imagenet', 16), ('dino-vits8', 8), ('dino-vits16', 16), ('dino-vitb8', 8), ('dino-vitb16', 16)]:
    bb = build_backbone(name, output_stride=stride, random_init=True).to(dev)
    x = torch.rand(8, 3, 473, 473, device=dev)
    res = {}
    for mode in ['fp32', 'bf16']:
        ctx = torch.autocast('cuda', dtype=torch.bfloat16, enabled=(mode == 'bf16'))
        with torch.inference_mode(), ctx:
            for _ in range(3): out = bb(x)
            torch.cuda.synchronize(); t = time.perf_counter()
            for _ in range(10): out = bb(x)
            torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
        res[mode] = (out[bb.embed_layer].float(), dt)
    f, h = res['fp32'][0], res['bf16'][0]
    cos = torch.nn.functional.cosine_similarity(f, h, dim=1).mean().item()
    print(f"{name} os{stride}: out {tuple(f.shape)} fp32 {8/res['fp32'][1]:.0f} img/s, bf16 {8/res['bf16'][1]:.0f} img/s, mean per-pixel cosine fp32-vs-bf16 {cos:.4f}")
