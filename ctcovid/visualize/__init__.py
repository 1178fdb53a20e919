"""ctcovid.visualize: Grad-CAM heat maps, overlays and figures written as PNG (atomically)."""

from .gradcam import gradcam_heatmap, gradcam_with_logits, overlay_heatmap, save_png_atomic

__all__ = ["gradcam_heatmap", "gradcam_with_logits", "overlay_heatmap", "save_png_atomic"]
