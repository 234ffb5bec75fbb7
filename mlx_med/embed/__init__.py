"""MedImageInsight: image-text-label contrastive embeddings for medical images.

Two towers (a DaViT or ViT image encoder from `mlx_med.vision`, a CLIP-style text transformer)
trained with the UniCL or the sigmoid (SigLIP) loss through the shared trainer; the embeddings
serve zero-shot classification, image-image search, kNN and linear-probe adapters, and ROC
evaluation with per-label operating points.
"""
