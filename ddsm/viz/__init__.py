"""What a trained model shows: predictions on a few images and where DDSM samples (no plotting here:
:mod:`reports.panels` draws what :func:`save_views` wrote)."""
from ddsm.viz.inspect import SamplingCall, offset_magnitudes, probe_pixels, sampling_calls, to_image_coords
from ddsm.viz.views import (OFFSET_EDGES, VIEWS_DIR, ViewSettings, image_name, pool_indices, save_views,
                            save_views_from_checkpoint)

__all__ = ["OFFSET_EDGES", "VIEWS_DIR", "SamplingCall", "ViewSettings", "image_name", "offset_magnitudes",
           "pool_indices", "probe_pixels", "sampling_calls", "save_views", "save_views_from_checkpoint",
           "to_image_coords"]
