from logitcache.cli import app

app(prog_name="logitcache")
