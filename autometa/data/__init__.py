"""Data: loading and type inference, preprocessing, task protocols and scoring, meta-features, bundled dataset builders."""
