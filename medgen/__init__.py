"""medgen: 3D generative models for brain MRI synthesis as data augmentation.

Importing the package is cheap: torch and MONAI are imported by the submodules that need them.
"""

__version__ = "0.1.0"
