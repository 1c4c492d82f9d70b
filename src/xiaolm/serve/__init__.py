"""`xiaolm serve`: the OpenAI-compatible server (app.py, api.py) and its chat page (static/chat.html)."""
