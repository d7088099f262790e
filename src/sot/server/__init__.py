"""`sot serve`'s web app: an OpenAI-compatible SoT server with an event stream and a side-by-side page."""

from sot.server.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
