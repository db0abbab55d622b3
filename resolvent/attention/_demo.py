def run(quick=False):
    print("chain attention: (placeholder)")
