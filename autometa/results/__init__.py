"""What a search leaves behind: saved models and the HTML report."""
