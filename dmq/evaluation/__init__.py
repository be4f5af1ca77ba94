"""Evaluation: fidelity to the floating-point pipeline (PSNR, SSIM), the digits domain metrics (domain-FID with
the shipped classifier's features, class accuracy), generation on fixed seeds and image grids."""
