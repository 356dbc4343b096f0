import { defineConfig } from "vite";

// The tray app loads the built files from disk; nothing is fetched at run time.
export default defineConfig({
  clearScreen: false,
  build: {
    outDir: "dist",
    target: "es2022",
    emptyOutDir: true,
    sourcemap: false,
  },
});
