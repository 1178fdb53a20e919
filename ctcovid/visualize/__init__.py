"""ctcovid.visualize: Grad-CAM heat maps, overlays and figures written as PNG (atomically)."""

from .gradcam import gradcam_heatmap, overlay_heatmap, save_png_atomic

__all__ = ["gradcam_heatmap", "overlay_heatmap", "save_png_atomic"]
