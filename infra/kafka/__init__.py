"""recloop: infra/kafka"""
