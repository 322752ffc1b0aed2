"""Pull endpoints of the LIS messages (/api/v1/batches/{id}/hl7/ and /fhir/) and the patient identifier an LIS
supplies with a slide (/api/v1/batches/{id}/patient/). Lab-scoped like every endpoint: another lab's slide is a 404."""

from __future__ import annotations

from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, viewsets
from rest_framework.decorators import action
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.response import Response

from accounts.scoping import get_scoped_or_404
from reports.models import Batch
from wbcsite.api_base import UUID_PATTERN, LabApiMixin, error_response
from wbcsite.api_errors import Conflict

from .current import current_messages
from .models import OutboxMessage, SlidePatient

HL7_MEDIA_TYPE = "x-application/hl7-v2+er7"
FHIR_MEDIA_TYPE = "application/fhir+json"


class HL7Renderer(BaseRenderer):
    media_type = HL7_MEDIA_TYPE
    format = "hl7"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        return data


class FHIRRenderer(BaseRenderer):
    media_type = FHIR_MEDIA_TYPE
    format = "fhir"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        return data


class SlidePatientSerializer(serializers.ModelSerializer):
    patient_id = serializers.CharField(max_length=100, help_text="LIS patient id (PID-3, Patient.identifier)")
    assigning_authority = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")

    class Meta:
        model = SlidePatient
        fields = ["patient_id", "assigning_authority"]


class LisBatchViewSet(LabApiMixin, viewsets.GenericViewSet):
    lookup_field = "uid"
    lookup_value_regex = UUID_PATTERN
    serializer_class = SlidePatientSerializer
    submit_actions = frozenset({"patient"})

    def get_batch(self) -> Batch:
        return get_scoped_or_404(
            Batch.objects.select_related("laboratory", "model"), self.request.user, uid=self.kwargs["uid"]
        )

    def _message(self, message_format: str, content_type: str) -> HttpResponse:
        messages = current_messages(self.get_batch())
        if messages is None:
            raise Conflict(
                "This slide has no final (signed) report yet, and your laboratory does not send AI-only results.",
                code="not_signed",
            )
        response = HttpResponse(messages[message_format], content_type=f"{content_type}; charset=utf-8")
        response["X-Message-Control-Id"] = messages["control_id"]
        return response

    @extend_schema(
        summary="The current report as an HL7 v2.5.1 ORU^R01 message",
        description=(
            "The message of the slide's current final version (a correction after an amendment: OBR-25 `C`); the "
            "same bytes the outbox sends. Without a final version: 409, unless the laboratory sends AI-only "
            "results (then a preliminary message, status `P`, with automated-differential codes)."
        ),
        responses={
            (200, HL7_MEDIA_TYPE): OpenApiResponse(OpenApiTypes.STR, description="ER7, segments ended by CR"),
            409: error_response("The slide has no final report yet."),
        },
        tags=["lis"],
    )
    @action(detail=True, methods=["get"], renderer_classes=[HL7Renderer, JSONRenderer])
    def hl7(self, request, uid=None):
        return self._message(OutboxMessage.Format.HL7, HL7_MEDIA_TYPE)

    @extend_schema(
        summary="The current report as a FHIR R4 transaction Bundle",
        description=(
            "A DiagnosticReport (final, or corrected after an amendment) and one Observation per cell type, each a "
            "conditional update on the report identifier; the same JSON the outbox sends."
        ),
        responses={
            (200, FHIR_MEDIA_TYPE): OpenApiResponse(OpenApiTypes.OBJECT, description="a FHIR R4 Bundle"),
            409: error_response("The slide has no final report yet."),
        },
        tags=["lis"],
    )
    @action(detail=True, methods=["get"], renderer_classes=[FHIRRenderer, JSONRenderer])
    def fhir(self, request, uid=None):
        return self._message(OutboxMessage.Format.FHIR, FHIR_MEDIA_TYPE)

    @extend_schema(
        summary="The patient identifier the LIS supplies with a slide",
        description="PUT sets it (PID-3 / Patient.identifier of later messages); without one, messages carry the "
        "accession only.",
        request=SlidePatientSerializer,
        responses={200: SlidePatientSerializer},
        tags=["lis"],
    )
    @action(detail=True, methods=["put"])
    def patient(self, request, uid=None):
        batch = self.get_batch()
        serializer = SlidePatientSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        SlidePatient.objects.update_or_create(batch=batch, defaults=serializer.validated_data)
        return Response(serializer.data)
