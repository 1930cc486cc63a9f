"""Evaluation metrics for CT kernel harmonization.

One module per measurement: ``fid`` (Table I), ``radiomics_features`` + ``radiomics_alignment`` (Table II),
``welch`` (the statistical decision both use), ``structure`` (lung structure preservation), ``frd``
(Frechet Radiomic Distance), ``paired`` (PSNR/SSIM/NPS against simulated ground truth), ``harmonize``
(running a model file's generator on prepared canvases), ``testset`` (the test split through
``Training.data.dataset``) and ``report`` (tables, report.md, figures). Clinical quantities (issue 17):
``agreement`` (Lin's CCC, Bland-Altman), ``lung_density`` (%LAA, PD15, MLD), ``radiomic_reproducibility``
(CCC over matched ROIs), ``clinical`` (all of them for {method: HU stack} vs a target) and
``clinical_report`` (markdown, summary, plots).
Submodules are imported on demand so that light users (the trainer's periodic hook) stay cheap.
"""
