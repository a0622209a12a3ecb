"""IBSI mode: PyRadiomics values turned into the IBSI 1 definitions, and the name map.

PyRadiomics departs from the Image Biomarker Standardisation Initiative
(IBSI 1, Zwanenburg et al., Radiology 2020) in a few feature definitions that
can be undone after the fact, from values PyRadiomics reports:

- ``firstorder_Kurtosis`` is the kurtosis, IBSI's ``stat_kurt`` the excess
  kurtosis: 3 lower (PyRadiomics' 0 for a flat region stays 0).
- ``shape_{Major,Minor,Least}AxisLength`` come from a covariance matrix
  divided by N, IBSI's from one divided by N - 1 (PyRadiomics issue #610):
  each length is multiplied by sqrt(N / (N - 1)), N being the voxels of the
  mask the shape class saw. Elongation and flatness are ratios: unchanged.
- ``firstorder_Energy``, ``TotalEnergy`` and ``RootMeanSquared`` add
  ``voxelArrayShift`` to every intensity first (the project's parameter
  files shift by 300); IBSI's energy and root mean square do not. With
  mean m, variance v (both unshifted) and the shifted RMS r, the unshifted
  sum of squares is N (v + m^2) with N = Energy / r^2, so the shift is
  undone without knowing it.

What cannot be undone is PyRadiomics' preprocessing (its FAQ): fixed bin
width edges start at a multiple of the bin width rather than at the ROI's
(or re-segmentation range's) minimum, resampling grids are aligned at the
origin corner, grey levels are not rounded after interpolation. Values of
IBSI mode are IBSI's definitions on PyRadiomics' discretised and resampled
image; ``docs/ibsi.md`` says more.

The tables below map the PyRadiomics features the project's parameter files
compute to IBSI 1 feature tags (3D texture matrices, features computed per
direction and averaged, as PyRadiomics does), list those with no IBSI
definition, and the IBSI 1 features the project does not compute, with the
reason. ``tests/pipelines/test_radiomics_ibsi.py`` checks every mapped
feature on the IBSI digital phantom and that the tables account for every
feature on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

AXES = ("MajorAxisLength", "MinorAxisLength", "LeastAxisLength")
_AXIS_FEATURES = frozenset(f"shape_{axis}" for axis in AXES)

# PyRadiomics feature (class_Feature, no image-type prefix) -> IBSI 1 tags. A
# feature with several tags is mathematically equal to each (PyRadiomics'
# own docstrings say so where it deprecated the duplicate).
IBSI_TAGS: dict[str, tuple[str, ...]] = {
    # Morphology
    "shape_MeshVolume": ("morph_volume",),
    "shape_VoxelVolume": ("morph_vol_approx",),
    "shape_SurfaceArea": ("morph_area_mesh",),
    "shape_SurfaceVolumeRatio": ("morph_av",),
    "shape_Sphericity": ("morph_sphericity",),
    "shape_Maximum3DDiameter": ("morph_diam",),
    "shape_MajorAxisLength": ("morph_pca_maj_axis",),
    "shape_MinorAxisLength": ("morph_pca_min_axis",),
    "shape_LeastAxisLength": ("morph_pca_least_axis",),
    "shape_Elongation": ("morph_pca_elongation",),
    "shape_Flatness": ("morph_pca_flatness",),
    # Intensity statistics (grey levels before discretisation)
    "firstorder_Mean": ("stat_mean",),
    "firstorder_Variance": ("stat_var",),
    "firstorder_Skewness": ("stat_skew",),
    "firstorder_Kurtosis": ("stat_kurt",),
    "firstorder_Median": ("stat_median",),
    "firstorder_Minimum": ("stat_min",),
    "firstorder_10Percentile": ("stat_p10",),
    "firstorder_90Percentile": ("stat_p90",),
    "firstorder_Maximum": ("stat_max",),
    "firstorder_InterquartileRange": ("stat_iqr",),
    "firstorder_Range": ("stat_range",),
    "firstorder_MeanAbsoluteDeviation": ("stat_mad",),
    "firstorder_RobustMeanAbsoluteDeviation": ("stat_rmad",),
    "firstorder_Energy": ("stat_energy",),
    "firstorder_RootMeanSquared": ("stat_rms",),
    # Intensity histogram (discretised grey levels); the NGLDM counts every
    # voxel once, so its normalised grey level non-uniformity is the uniformity
    "firstorder_Entropy": ("ih_entropy",),
    "firstorder_Uniformity": ("ih_uniformity", "ngl_glnu_norm_3D"),
    # Grey level co-occurrence matrix, 3D, averaged over the 13 directions
    "glcm_MaximumProbability": ("cm_joint_max_3D_avg",),
    "glcm_JointAverage": ("cm_joint_avg_3D_avg",),
    "glcm_SumSquares": ("cm_joint_var_3D_avg",),
    "glcm_JointEntropy": ("cm_joint_entr_3D_avg",),
    "glcm_DifferenceAverage": ("cm_diff_avg_3D_avg", "cm_dissimilarity_3D_avg"),
    "glcm_DifferenceVariance": ("cm_diff_var_3D_avg",),
    "glcm_DifferenceEntropy": ("cm_diff_entr_3D_avg",),
    "glcm_SumAverage": ("cm_sum_avg_3D_avg",),
    "glcm_SumEntropy": ("cm_sum_entr_3D_avg",),
    "glcm_JointEnergy": ("cm_energy_3D_avg",),
    "glcm_Contrast": ("cm_contrast_3D_avg",),
    "glcm_Id": ("cm_inv_diff_3D_avg",),
    "glcm_Idn": ("cm_inv_diff_norm_3D_avg",),
    "glcm_Idm": ("cm_inv_diff_mom_3D_avg",),
    "glcm_Idmn": ("cm_inv_diff_mom_norm_3D_avg",),
    "glcm_InverseVariance": ("cm_inv_var_3D_avg",),
    "glcm_Correlation": ("cm_corr_3D_avg",),
    "glcm_Autocorrelation": ("cm_auto_corr_3D_avg",),
    "glcm_ClusterTendency": ("cm_clust_tend_3D_avg", "cm_sum_var_3D_avg"),
    "glcm_ClusterShade": ("cm_clust_shade_3D_avg",),
    "glcm_ClusterProminence": ("cm_clust_prom_3D_avg",),
    "glcm_Imc1": ("cm_info_corr1_3D_avg",),
    "glcm_Imc2": ("cm_info_corr2_3D_avg",),
    # Grey level run length matrix, 3D, averaged over the 13 directions
    "glrlm_ShortRunEmphasis": ("rlm_sre_3D_avg",),
    "glrlm_LongRunEmphasis": ("rlm_lre_3D_avg",),
    "glrlm_LowGrayLevelRunEmphasis": ("rlm_lgre_3D_avg",),
    "glrlm_HighGrayLevelRunEmphasis": ("rlm_hgre_3D_avg",),
    "glrlm_ShortRunLowGrayLevelEmphasis": ("rlm_srlge_3D_avg",),
    "glrlm_ShortRunHighGrayLevelEmphasis": ("rlm_srhge_3D_avg",),
    "glrlm_LongRunLowGrayLevelEmphasis": ("rlm_lrlge_3D_avg",),
    "glrlm_LongRunHighGrayLevelEmphasis": ("rlm_lrhge_3D_avg",),
    "glrlm_GrayLevelNonUniformity": ("rlm_glnu_3D_avg",),
    "glrlm_GrayLevelNonUniformityNormalized": ("rlm_glnu_norm_3D_avg",),
    "glrlm_RunLengthNonUniformity": ("rlm_rlnu_3D_avg",),
    "glrlm_RunLengthNonUniformityNormalized": ("rlm_rlnu_norm_3D_avg",),
    "glrlm_RunPercentage": ("rlm_r_perc_3D_avg",),
    "glrlm_GrayLevelVariance": ("rlm_gl_var_3D_avg",),
    "glrlm_RunVariance": ("rlm_rl_var_3D_avg",),
    "glrlm_RunEntropy": ("rlm_rl_entr_3D_avg",),
    # Grey level size zone matrix, 3D (26-connected zones)
    "glszm_SmallAreaEmphasis": ("szm_sze_3D",),
    "glszm_LargeAreaEmphasis": ("szm_lze_3D",),
    "glszm_LowGrayLevelZoneEmphasis": ("szm_lgze_3D",),
    "glszm_HighGrayLevelZoneEmphasis": ("szm_hgze_3D",),
    "glszm_SmallAreaLowGrayLevelEmphasis": ("szm_szlge_3D",),
    "glszm_SmallAreaHighGrayLevelEmphasis": ("szm_szhge_3D",),
    "glszm_LargeAreaLowGrayLevelEmphasis": ("szm_lzlge_3D",),
    "glszm_LargeAreaHighGrayLevelEmphasis": ("szm_lzhge_3D",),
    "glszm_GrayLevelNonUniformity": ("szm_glnu_3D",),
    "glszm_GrayLevelNonUniformityNormalized": ("szm_glnu_norm_3D",),
    "glszm_SizeZoneNonUniformity": ("szm_zsnu_3D",),
    "glszm_SizeZoneNonUniformityNormalized": ("szm_zsnu_norm_3D",),
    "glszm_ZonePercentage": ("szm_z_perc_3D",),
    "glszm_GrayLevelVariance": ("szm_gl_var_3D",),
    "glszm_ZoneVariance": ("szm_zs_var_3D",),
    "glszm_ZoneEntropy": ("szm_zs_entr_3D",),
    # Neighbouring grey level dependence matrix, 3D, Chebyshev distance 1, alpha 0
    "gldm_SmallDependenceEmphasis": ("ngl_lde_3D",),
    "gldm_LargeDependenceEmphasis": ("ngl_hde_3D",),
    "gldm_LowGrayLevelEmphasis": ("ngl_lgce_3D",),
    "gldm_HighGrayLevelEmphasis": ("ngl_hgce_3D",),
    "gldm_SmallDependenceLowGrayLevelEmphasis": ("ngl_ldlge_3D",),
    "gldm_SmallDependenceHighGrayLevelEmphasis": ("ngl_ldhge_3D",),
    "gldm_LargeDependenceLowGrayLevelEmphasis": ("ngl_hdlge_3D",),
    "gldm_LargeDependenceHighGrayLevelEmphasis": ("ngl_hdhge_3D",),
    "gldm_GrayLevelNonUniformity": ("ngl_glnu_3D",),
    "gldm_DependenceNonUniformity": ("ngl_dcnu_3D",),
    "gldm_DependenceNonUniformityNormalized": ("ngl_dcnu_norm_3D",),
    "gldm_GrayLevelVariance": ("ngl_gl_var_3D",),
    "gldm_DependenceVariance": ("ngl_dc_var_3D",),
    "gldm_DependenceEntropy": ("ngl_dc_entr_3D",),
    # Neighbourhood grey tone difference matrix, 3D, distance 1
    "ngtdm_Coarseness": ("ngt_coarseness_3D",),
    "ngtdm_Contrast": ("ngt_contrast_3D",),
    "ngtdm_Busyness": ("ngt_busyness_3D",),
    "ngtdm_Complexity": ("ngt_complexity_3D",),
    "ngtdm_Strength": ("ngt_strength_3D",),
}

# PyRadiomics features the project computes that IBSI 1 does not define.
NO_IBSI_DEFINITION: dict[str, str] = {
    "shape_Maximum2DDiameterSlice": "in-plane diameters are not IBSI 1 features",
    "shape_Maximum2DDiameterColumn": "in-plane diameters are not IBSI 1 features",
    "shape_Maximum2DDiameterRow": "in-plane diameters are not IBSI 1 features",
    "firstorder_TotalEnergy": (
        "energy times the voxel volume; not an IBSI 1 feature (IBSI mode removes"
        " voxelArrayShift from it as from Energy)"
    ),
    "glcm_MCC": "maximal correlation coefficient; not an IBSI 1 feature",
}

_NOT_IN_PYRADIOMICS = "PyRadiomics has no such feature"
_DEPRECATED = (
    "PyRadiomics deprecates it as a function of sphericity and the project's parameter"
    " files do not enable deprecated features"
)
_BEFORE_DISCRETISATION = (
    "PyRadiomics computes this statistic on the grey levels before discretisation"
    " (the stat_ feature), not on the discretised ones"
)

# IBSI 1 features (tags of the digital phantom's reference set) that the
# project does not compute, with the reason; texture families in other
# aggregations are in NOT_COMPUTED_FAMILIES.
NOT_COMPUTED: dict[str, str] = {
    "morph_comp_1": _DEPRECATED,
    "morph_comp_2": _DEPRECATED,
    "morph_sph_dispr": _DEPRECATED,
    **{
        tag: _NOT_IN_PYRADIOMICS
        for tag in (
            "morph_asphericity",
            "morph_com",
            "morph_vol_dens_aabb",
            "morph_area_dens_aabb",
            "morph_vol_dens_ombb",
            "morph_area_dens_ombb",
            "morph_vol_dens_aee",
            "morph_area_dens_aee",
            "morph_vol_dens_mvee",
            "morph_area_dens_mvee",
            "morph_vol_dens_conv_hull",
            "morph_area_dens_conv_hull",
            "morph_integ_int",
            "morph_moran_i",
            "morph_geary_c",
            "loc_peak_loc",
            "loc_peak_glob",
            "stat_medad",
            "stat_cov",
            "stat_qcod",
            "ih_mode",
            "ih_medad",
            "ih_cov",
            "ih_qcod",
            "ih_max_grad",
            "ih_max_grad_g",
            "ih_min_grad",
            "ih_min_grad_g",
            "ivh_v10",
            "ivh_v90",
            "ivh_i10",
            "ivh_i90",
            "ivh_diff_v10_v90",
            "ivh_diff_i10_i90",
            "ivh_auc",
            "ngl_dc_energy_3D",
        )
    },
    **{
        f"ih_{name}": _BEFORE_DISCRETISATION
        for name in (
            "mean",
            "var",
            "skew",
            "kurt",
            "median",
            "min",
            "p10",
            "p90",
            "max",
            "iqr",
            "range",
            "mad",
            "rmad",
        )
    },
    "ngl_dc_perc_3D": (
        "always 1 (every voxel has a dependence count); PyRadiomics deprecates it and the"
        " project's parameter files do not enable deprecated features"
    ),
}

_OTHER_AGGREGATION = (
    "other aggregation: PyRadiomics computes 3D matrices (force2D false), one per direction"
    " with features averaged (weightingNorm none), as the project's parameter files set"
)

# Families of the reference set (as the reference table names them) that the
# project does not compute at all.
NOT_COMPUTED_FAMILIES: dict[str, str] = {
    **{
        f"{matrix} matrix ({aggregation})": _OTHER_AGGREGATION
        for matrix in ("Co-occurrence", "Run length")
        for aggregation in (
            "2D, averaged",
            "2D, slice-merged",
            "2.5D, direction-merged",
            "2.5D, merged",
            "3D, merged",
        )
    },
    **{
        f"{matrix} ({aggregation})": _OTHER_AGGREGATION
        for matrix in (
            "Size zone matrix",
            "Neighbourhood grey tone difference matrix",
            "Neighbouring grey level dependence matrix",
        )
        for aggregation in ("2D", "2.5D")
    },
    **{
        f"Distance zone matrix ({aggregation})": "PyRadiomics has no distance zone matrix"
        for aggregation in ("2D", "2.5D", "3D")
    },
}


def split_name(column: str) -> tuple[str, str]:
    """``original_glcm_Idmn`` -> (``original``, ``glcm_Idmn``): image type and feature."""
    image_type, _, feature = column.partition("_")
    return image_type, feature


def has_axis_lengths(values: Mapping[str, float]) -> bool:
    """Whether a result holds axis lengths (and :func:`to_ibsi` needs the shape voxel count)."""
    return any(split_name(column)[1] in _AXIS_FEATURES for column in values)


def to_ibsi(
    values: Mapping[str, float], *, shape_voxels: int | None, undo_shift: bool
) -> dict[str, float]:
    """PyRadiomics feature values (``<image type>_<class>_<Feature>``) in IBSI's definitions.

    Parameters
    ----------
    values
        One PyRadiomics result, diagnostics left out.
    shape_voxels
        Voxels of the mask the shape class saw; needed when axis lengths are present.
    undo_shift
        Whether ``voxelArrayShift`` is non-zero for some image type: energy,
        total energy and RMS are then recomputed without it.

    Raises
    ------
    ValueError
        When a correction lacks what it needs (the message says what).
    """
    out = dict(values)
    for column, value in values.items():
        image_type, feature = split_name(column)
        if feature == "firstorder_Kurtosis" and value != 0:  # 0: PyRadiomics' flat region
            out[column] = value - 3.0
        elif feature in _AXIS_FEATURES:
            if shape_voxels is None:
                raise ValueError("axis lengths need the shape mask's voxel count")
            if shape_voxels > 1:
                out[column] = value * math.sqrt(shape_voxels / (shape_voxels - 1))
        elif feature == "firstorder_Energy" and undo_shift:
            out.update(_unshifted(values, image_type))
    return out


def _unshifted(values: Mapping[str, float], image_type: str) -> dict[str, float]:
    """Energy, total energy and RMS of one image type without ``voxelArrayShift``."""
    names = ("Energy", "RootMeanSquared", "Mean", "Variance")
    columns = {name: f"{image_type}_firstorder_{name}" for name in names}
    missing = [name for name, column in columns.items() if column not in values]
    if missing:
        raise ValueError(
            f"undoing voxelArrayShift on {image_type} needs firstorder {', '.join(missing)}"
            " beside Energy (or set voxelArrayShift: 0)"
        )
    energy, rms, mean, variance = (values[columns[name]] for name in names)
    squares = variance + mean * mean  # mean of the unshifted squares
    if rms == 0.0:  # every shifted intensity is 0: N is lost unless nothing was shifted
        if squares != 0.0:
            raise ValueError(f"cannot undo voxelArrayShift on {image_type}: shifted RMS is 0")
        return {}
    ratio = squares / (rms * rms)
    out = {columns["Energy"]: energy * ratio, columns["RootMeanSquared"]: math.sqrt(squares)}
    total = f"{image_type}_firstorder_TotalEnergy"
    if total in values:
        out[total] = values[total] * ratio
    return out


def shape_voxel_count(diagnostics: Mapping[str, object], *, resegment_shape: bool) -> int:
    """Voxels of the mask PyRadiomics' shape class saw, from its ``diagnostics_*`` entries.

    The shape mask is the loaded mask, resampled (``interpolated``), then
    corrected onto the image grid when needed (``corrected``), and
    re-segmented only when ``resegmentShape`` is set: the last of these
    PyRadiomics reports.

    Raises
    ------
    ValueError
        When the diagnostics hold no voxel count.
    """
    stages = ["original", "interpolated", "corrected"] + (
        ["resegmented"] if resegment_shape else []
    )
    counts = [
        diagnostics[key]
        for stage in stages
        if (key := f"diagnostics_Mask-{stage}_VoxelNum") in diagnostics
    ]
    if not counts:
        raise ValueError("PyRadiomics reported no mask voxel count (additionalInfo off?)")
    count = counts[-1]
    if not isinstance(count, int | float) or count != int(count):
        raise ValueError(f"PyRadiomics reported a mask voxel count of {count!r}")
    return int(count)


def markdown_tables() -> str:
    """The mapping and the not-computed lists as Markdown (``docs/ibsi.md`` holds this)."""
    lines = ["| PyRadiomics feature | IBSI 1 tag | IBSI mode changes it |", "| --- | --- | --- |"]
    changed = {
        "firstorder_Kurtosis": "minus 3 (excess kurtosis)",
        **{f"shape_{a}": "times sqrt(N / (N - 1))" for a in AXES},
        "firstorder_Energy": "without voxelArrayShift",
        "firstorder_RootMeanSquared": "without voxelArrayShift",
    }
    for feature, tags in IBSI_TAGS.items():
        lines.append(
            f"| `{feature}` | {', '.join(f'`{t}`' for t in tags)} | {changed.get(feature, '')} |"
        )
    lines += ["", "| PyRadiomics feature without an IBSI 1 definition | why |", "| --- | --- |"]
    lines += [f"| `{feature}` | {why} |" for feature, why in NO_IBSI_DEFINITION.items()]
    lines += ["", "| IBSI 1 feature not computed | why |", "| --- | --- |"]
    lines += [f"| `{tag}` | {why} |" for tag, why in NOT_COMPUTED.items()]
    lines += ["", "| IBSI 1 family not computed | why |", "| --- | --- |"]
    lines += [f"| {family} | {why} |" for family, why in NOT_COMPUTED_FAMILIES.items()]
    return "\n".join(lines) + "\n"
