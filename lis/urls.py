from django.urls import path

from . import views

app_name = "lis"
urlpatterns = [
    path("", views.lis_settings, name="settings"),
    path("destinations/new/", views.destination_edit, name="destination_new"),
    path("destinations/<int:pk>/", views.destination_edit, name="destination_edit"),
    path("deliveries/", views.deliveries, name="deliveries"),
    path("deliveries/<int:pk>/", views.message_detail, name="message"),
    path("deliveries/<int:pk>/resend/", views.message_resend, name="message_resend"),
    path("slides/<uuid:uid>/", views.slide_deliveries, name="slide"),
]
