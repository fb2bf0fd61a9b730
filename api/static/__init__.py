"""Static assets of the web page (a package only so that wheels ship these files)."""
