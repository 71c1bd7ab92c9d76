// `npm run lint:ts` runs this (with tsc --noEmit and prettier --check); prettier owns the layout.
import js from '@eslint/js'
import globals from 'globals'
import tseslint from 'typescript-eslint'

export default tseslint.config(
  {
    ignores: [
      'dist/',
      'docs/api/',
      'src/native.generated.ts',
      'native/',
      'target/',
      'node_modules/',
      'crates/',
      'fixtures/',
      '.venv*/',
      '.whl/',
      '.cuda/',
      '.zig/',
    ],
  },
  js.configs.recommended,
  tseslint.configs.recommended,
  {
    rules: {
      // the optax idiom `let updates; [updates, state] = opt.update(...)` (as in the README) reassigns one of the pair
      'prefer-const': ['error', { destructuring: 'all' }],
    },
  },
  {
    files: ['scripts/**/*.js'],
    languageOptions: { sourceType: 'commonjs', globals: globals.node },
    rules: {
      // plain CommonJS scripts run by node as they are (no build step): require() is how they import
      '@typescript-eslint/no-require-imports': 'off',
    },
  },
)
