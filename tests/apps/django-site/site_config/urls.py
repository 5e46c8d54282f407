import django
from django.shortcuts import render
from django.urls import path


def index(request):
    return render(request, "index.html", {"version": django.get_version()})


urlpatterns = [path("", index)]
