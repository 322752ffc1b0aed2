"""Verbs that touch several models: classifying an upload, making a saliency map."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from django.conf import settings
from django.core.cache import cache
from django.core.files.base import ContentFile
from django.db import transaction

from accounts.scoping import scoped
from wbc_ml import saliency
from wbc_ml.inference import ModelUnavailable, Result, get_classifier
from wbc_ml.preprocessing import FILE_SUFFIXES, ImageRejected, decode_image, resize, sniff_image_type
from wbc_ml.saliency_child import saliency_in_sandbox

from .models import ClassifierModel, Prediction

GRADCAM_KEEP_S = 600  # a result page or an API client asks for the map within seconds of classifying


def usable_models(user):
    """The active models of the user's laboratory, shared ones included."""
    return scoped(ClassifierModel.objects.usable(), user)


@dataclass(frozen=True)
class UploadedImage:
    name: str
    data: bytes


def read_upload(uploaded_file) -> UploadedImage:
    """Read at most one byte more than the cap, so a huge upload is refused without reading it all."""
    if uploaded_file is None:
        raise ImageRejected("No file was chosen: pick or drop a JPEG or PNG image.")
    name = uploaded_file.name or "image"
    if uploaded_file.size is not None and uploaded_file.size > settings.WBC_MAX_IMAGE_BYTES:
        raise ImageRejected(f"{name}: the file is larger than {settings.WBC_MAX_IMAGE_BYTES // (1024 * 1024)} MB.")
    data = uploaded_file.read(settings.WBC_MAX_IMAGE_BYTES + 1)
    return UploadedImage(name=name, data=data)


def new_prediction(
    user,
    model_record: ClassifierModel,
    *,
    normalization: dict,
    name: str,
    size: tuple[int, int],
    result: Result,
    processing_ms: float,
    image_name: str = "",
) -> Prediction:
    """An unsaved Prediction for one classified image (the one rule for single images and batch items)."""
    width, height = size
    return Prediction(
        laboratory_id=user.laboratory_id,
        user=user,
        model=model_record,
        model_version=model_record.version,
        model_sha256=model_record.sha256,  # the file get_classifier verified before this prediction
        normalization=normalization,
        original_filename=name[:255],
        width=width,
        height=height,
        predicted_class=model_record.class_names[result.class_index],
        confidence=result.confidence,
        probabilities=[round(float(p), 6) for p in result.probabilities],
        ood_score=result.ood_score,
        is_outlier=result.is_outlier,
        processing_ms=processing_ms,
        image=image_name,
    )


def classify_image(
    user, upload: UploadedImage, model_record: ClassifierModel, normalization: dict | None = None
) -> Prediction:
    """Decode, classify and store one image. Raises ImageRejected or ModelUnavailable, storing nothing.

    ``normalization`` overrides the model card's (the user's choice on the page); None keeps the card's.
    """
    image = decode_image(
        upload.data,
        name=upload.name,
        max_bytes=settings.WBC_MAX_IMAGE_BYTES,
        max_pixels=settings.WBC_MAX_IMAGE_PIXELS,
    )
    spec = model_record.spec(normalization)
    classifier = get_classifier(spec)  # the file loads once per process; not part of the timing
    started = time.perf_counter()
    pixels = resize(image, model_record.input_size)
    result = classifier.predict(pixels[None])[0]
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    prediction = new_prediction(
        user,
        model_record,
        normalization=spec.normalization,
        name=upload.name,
        size=image.size,
        result=result,
        processing_ms=elapsed_ms,
    )
    prediction.image.save(
        f"upload{FILE_SUFFIXES[sniff_image_type(upload.data) or 'JPEG']}", ContentFile(upload.data), save=False
    )
    try:
        with transaction.atomic():
            prediction.save()
    except Exception:
        prediction.image.delete(save=False)  # nothing half-stored
        raise
    keep_gradcam(prediction, result)
    remember_model(user, model_record)
    return prediction


def remember_model(user, model_record: ClassifierModel) -> None:
    """The model last used becomes the user's default on the classify and batch pages."""
    if user.default_model_id != model_record.pk:
        user.default_model = model_record
        user.save(update_fields=["default_model"])


def ensure_saliency(prediction: Prediction, method: str):
    """The stored saliency overlay (WebP) for ``method``, made on first request and kept.

    Made in this process only without loading TensorFlow for it (:func:`_heatmap_here`); otherwise by TensorFlow in a
    sandboxed child (:mod:`wbc_ml.saliency_child`): the input-gradient map, and Grad-CAM of a model whose ONNX copy
    has no map output.
    """
    if method not in saliency.METHODS:
        raise ValueError(method)
    field = getattr(prediction, method)
    if field:
        return field
    record = prediction.model
    spec = record.spec(prediction.normalization or None)
    with prediction.image.open("rb") as handle:
        data = handle.read()
    class_index = record.class_names.index(prediction.predicted_class)
    image = decode_image(data, name=prediction.original_filename)
    heatmap = _heatmap_here(prediction, spec, image, class_index, method)
    if heatmap is not None:
        picture = saliency.overlay(image, heatmap)
    else:
        picture = saliency_in_sandbox(
            spec, data, class_index=class_index, method=method, image_name=prediction.original_filename
        )
    field.save(f"{prediction.uid}-{method}{saliency.OVERLAY_SUFFIX}", ContentFile(picture), save=False)
    Prediction.objects.filter(pk=prediction.pk).update(**{method: field.name})
    return field


def _heatmap_here(prediction: Prediction, spec, image, class_index: int, method: str):
    """The [0, 1] map, when this process can make it without loading TensorFlow for it; None otherwise.

    Grad-CAM comes from the ONNX copy: the map kept when the image was classified, else one more ONNX run. When this
    process already serves the model with TensorFlow (a bundled model without a usable ONNX copy), TensorFlow makes
    either map here, as it is loaded anyway.
    """
    if method == "gradcam":
        kept = cache.get(_gradcam_cache_key(prediction.uid))
        if kept is not None:
            return saliency.gradcam_from_raw(kept)
    classifier = get_classifier(spec)
    pixels = resize(image, spec.input_size)
    if method == "gradcam" and classifier.has_gradcam:
        return saliency.gradcam_from_raw(classifier.gradcam_raw(pixels, class_index))
    if classifier.serves_with_tensorflow:
        return saliency.saliency_map(classifier, pixels, class_index, method)
    return None


def keep_gradcam(prediction: Prediction, result: Result) -> None:
    """Keep the map the classification already computed for a while, so fetching its Grad-CAM needs no second run
    (in the shared cache: another web process or host finds it too)."""
    if result.gradcam_raw is not None:
        cache.set(_gradcam_cache_key(prediction.uid), np.asarray(result.gradcam_raw, np.float32), GRADCAM_KEEP_S)


def _gradcam_cache_key(uid) -> str:
    return f"wbc:gradcam-raw:{uid}"


def saliency_content_type(field) -> str:
    """The Content-Type of a stored overlay (WebP, or PNG for maps stored before WebP)."""
    return saliency.content_type(field.name)


__all__ = [
    "ImageRejected",
    "ModelUnavailable",
    "classify_image",
    "ensure_saliency",
    "new_prediction",
    "read_upload",
    "saliency_content_type",
    "usable_models",
]
