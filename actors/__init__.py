"""recloop: actors"""
